"""probe values: the epoch-end probes of issue 21.3 (gradients, smoothness, percentiles, gamma, gaps)

Revision ID: 0007_probes
Revises: 0006_lifecycle
Create Date: 2026-12-06
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007_probes"
down_revision: str | None = "0006_lifecycle"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "probe_values",
        sa.Column("run_id", sa.String(length=32), nullable=False),
        sa.Column("probe", sa.String(length=32), nullable=False),
        sa.Column("epoch", sa.Integer(), nullable=False),
        sa.Column("layer", sa.String(length=128), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("value", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("run_id", "probe", "epoch", "layer", "name"),
    )


def downgrade() -> None:
    op.drop_table("probe_values")
