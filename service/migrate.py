"""Apply the Alembic migrations: the only way bnlab's schema is created.

bnlab's revision lives in `bnlab_alembic_version`, not Alembic's default `alembic_version`, which
Optuna's RDB storage uses for its own tables (the searches' studies share bnlab's database). A
database migrated before the rename has bnlab's revision in `alembic_version`: that table is renamed
before upgrading, so the database carries over and Optuna can then create its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, inspect, text

from service.config import get_settings
from service.db import make_engine

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
VERSION_TABLE = "bnlab_alembic_version"
LEGACY_VERSION_TABLE = "alembic_version"
# Optuna's RDB storage tables (optuna.storages.RDBStorage creates them on first use, with its own
# `alembic_version`): in bnlab's database but no part of bnlab's schema, so autogenerate and the
# schema test leave them alone.
OPTUNA_TABLES = frozenset(
    {
        "alembic_version",
        "studies",
        "study_directions",
        "study_system_attributes",
        "study_user_attributes",
        "trial_heartbeats",
        "trial_intermediate_values",
        "trial_params",
        "trial_system_attributes",
        "trial_user_attributes",
        "trial_values",
        "trials",
        "version_info",
    }
)


def is_bnlab_object(name: str | None, type_: str, _parent_names: Any) -> bool:
    """Alembic's include_name: every table but Optuna's."""
    return not (type_ == "table" and name in OPTUNA_TABLES)


def alembic_config(url: str | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url:
        config.attributes["url"] = url
    return config


def carry_over_version_table(connection: Connection) -> bool:
    """Rename `alembic_version` to bnlab's version table when it holds a bnlab revision (a database
    migrated before bnlab had its own table). Returns whether it renamed."""
    tables = set(inspect(connection).get_table_names())
    if LEGACY_VERSION_TABLE not in tables or VERSION_TABLE in tables:
        return False
    revisions = {r.revision for r in ScriptDirectory.from_config(alembic_config()).walk_revisions()}
    held = set(connection.execute(text(f"SELECT version_num FROM {LEGACY_VERSION_TABLE}")).scalars())
    if not held or not held <= revisions:  # empty, or Optuna's: not bnlab's to take
        return False
    connection.execute(text(f"ALTER TABLE {LEGACY_VERSION_TABLE} RENAME TO {VERSION_TABLE}"))
    return True


def upgrade_to_head(url: str | None = None) -> None:
    engine = make_engine(url or get_settings().sqlalchemy_url)
    try:
        with engine.begin() as connection:
            carry_over_version_table(connection)
    finally:
        engine.dispose()
    command.upgrade(alembic_config(url), "head")
