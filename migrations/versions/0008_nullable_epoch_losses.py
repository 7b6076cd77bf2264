"""nullable epoch losses: a diverged epoch is stored with its non-finite values as NULL

A run whose loss becomes NaN or infinite is recorded up to the epoch where it diverged (and then
ends failed, saying so). SQLite stores NaN as NULL, which the NOT NULL columns refused, and JSON has
no NaN either: the losses and accuracies of an epoch, and a norm slot's input mean and std, are
nullable, and the repository writes every non-finite value as NULL on both databases.

Revision ID: 0008_nullable_epoch_losses
Revises: 0007_probes
Create Date: 2026-12-06
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008_nullable_epoch_losses"
down_revision: str | None = "0007_probes"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

EPOCH_COLUMNS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy")
SLOT_COLUMNS = ("input_mean", "input_std")


def _set_nullable(table: str, columns: Sequence[str], *, nullable: bool) -> None:
    # Batch mode: SQLite cannot ALTER a column's nullability, so the table is copied and renamed.
    with op.batch_alter_table(table, schema=None) as batch_op:
        for column in columns:
            batch_op.alter_column(column, existing_type=sa.Float(), nullable=nullable)


def upgrade() -> None:
    _set_nullable("epoch_metrics", EPOCH_COLUMNS, nullable=True)
    _set_nullable("layer_stats", SLOT_COLUMNS, nullable=True)


def downgrade() -> None:
    # The older schema cannot hold a diverged epoch: its rows go (the run's status and error stay).
    for table, columns in (("epoch_metrics", EPOCH_COLUMNS), ("layer_stats", SLOT_COLUMNS)):
        op.execute(f"DELETE FROM {table} WHERE " + " OR ".join(f"{c} IS NULL" for c in columns))
        _set_nullable(table, columns, nullable=False)
