"""searches: Optuna searches whose trials train as experiments (the studies live in Optuna's tables)

Revision ID: 0009_searches
Revises: 0008_nullable_epoch_losses
Create Date: 2026-12-06
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0009_searches"
down_revision: str | None = "0008_nullable_epoch_losses"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")


def upgrade() -> None:
    op.create_table(
        "searches",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("owner", sa.String(length=100), nullable=True),
        sa.Column("spec", JSON, nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("study_name", sa.String(length=200), nullable=False),
        sa.Column("trials_asked", sa.Integer(), nullable=False),
        sa.Column("advancing_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("pokes", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("study_name"),
    )
    op.create_index(op.f("ix_searches_owner"), "searches", ["owner"])
    op.create_index(op.f("ix_searches_created_at"), "searches", ["created_at"])
    op.create_table(
        "search_trials",
        sa.Column("search_id", sa.String(length=32), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("trial_id", sa.Integer(), nullable=False),
        sa.Column("experiment_id", sa.String(length=32), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("params", JSON, nullable=False),
        sa.Column("value", sa.Float(), nullable=True),
        sa.Column("mean", sa.Float(), nullable=True),
        sa.Column("std", sa.Float(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["search_id"], ["searches.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["experiment_id"], ["experiments.id"], ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("search_id", "number"),
    )
    op.create_index(op.f("ix_search_trials_experiment_id"), "search_trials", ["experiment_id"])


def downgrade() -> None:
    op.drop_table("search_trials")
    op.drop_table("searches")
