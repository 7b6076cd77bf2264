"""Alembic environment: the database URL comes from bnlab's settings, the metadata from service.models.

bnlab records its revision in its own table, `bnlab_alembic_version`: Optuna's RDB storage (the
searches' studies live in the same database) keeps its schema revision in Alembic's default
`alembic_version`, and two schemas sharing one version table would each refuse or skip the other's.
"""

from __future__ import annotations

from alembic import context

from service.config import get_settings
from service.db import make_engine
from service.migrate import VERSION_TABLE, is_bnlab_object
from service.models import Base

target_metadata = Base.metadata


def run_migrations_offline() -> None:
    context.configure(
        url=get_settings().sqlalchemy_url,
        target_metadata=target_metadata,
        literal_binds=True,
        version_table=VERSION_TABLE,
        include_name=is_bnlab_object,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    url = context.config.attributes.get("url") or get_settings().sqlalchemy_url
    engine = make_engine(url)
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=True,
            version_table=VERSION_TABLE,
            include_name=is_bnlab_object,
        )
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
