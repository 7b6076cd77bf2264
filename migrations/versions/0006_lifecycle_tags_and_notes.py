"""run and experiment tags and notes

Revision ID: 0006_lifecycle
Revises: 0005
Create Date: 2026-12-06
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0006_lifecycle"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")


def upgrade() -> None:
    for table in ("runs", "experiments"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(sa.Column("tags", JSON, nullable=True))
            batch_op.add_column(sa.Column("notes", sa.Text(), nullable=True))


def downgrade() -> None:
    for table in ("runs", "experiments"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_column("notes")
            batch_op.drop_column("tags")
