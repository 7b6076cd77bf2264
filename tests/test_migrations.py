"""The schema comes only from Alembic migrations; they must match the SQLAlchemy models exactly.

bnlab keeps its revision in `bnlab_alembic_version`, so Optuna's RDB storage (searches) can keep its
own in `alembic_version` in the same database; a database migrated when bnlab still used
`alembic_version` carries over.
"""

from __future__ import annotations

from collections.abc import Callable

import optuna
import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text

from service.config import get_settings
from service.db import get_engine
from service.migrate import VERSION_TABLE, alembic_config, is_bnlab_object, upgrade_to_head
from service.models import Base
from tests.conftest import Backend

BACKENDS = pytest.mark.parametrize("backend_fixture", ["sqlite_backend", "postgres_backend"])


def bnlab_revision() -> str | None:
    with get_engine().connect() as connection:
        context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
        return context.get_current_revision()


def head() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


@BACKENDS
def test_migrations_create_exactly_the_models_schema(
    backend_fixture: str, request: pytest.FixtureRequest, use_backend: Callable[[Backend], None]
) -> None:
    use_backend(request.getfixturevalue(backend_fixture))  # runs `alembic upgrade head`
    with get_engine().connect() as connection:
        opts = {"include_name": is_bnlab_object, "version_table": VERSION_TABLE}
        context = MigrationContext.configure(connection, opts=opts)
        differences = compare_metadata(context, Base.metadata)
        tables = set(inspect(connection).get_table_names())
    assert differences == []
    assert {"runs", "epoch_metrics", "model_artifacts", "searches", "search_trials"} <= tables
    assert VERSION_TABLE in tables
    assert "alembic_version" not in tables  # left to Optuna
    assert bnlab_revision() == head()


def test_migrating_twice_is_a_no_op(sqlite_backend: Backend, use_backend: Callable[[Backend], None]) -> None:
    use_backend(sqlite_backend)
    use_backend(sqlite_backend)
    assert bnlab_revision() == head()


@BACKENDS
def test_a_database_on_the_old_version_table_carries_over_and_optuna_shares_it(
    backend_fixture: str, request: pytest.FixtureRequest, use_backend: Callable[[Backend], None]
) -> None:
    use_backend(request.getfixturevalue(backend_fixture))
    # Make it look like a database migrated to 0007 before bnlab had its own version table.
    command.downgrade(alembic_config(), "0007_probes")
    with get_engine().begin() as connection:
        connection.execute(text(f"ALTER TABLE {VERSION_TABLE} RENAME TO alembic_version"))
        connection.execute(
            text(
                "INSERT INTO runs (id, status, spec, cancel_requested, attempts, "
                "release_requested, epochs_done, created_at, updated_at) VALUES "
                "('r1', 'succeeded', '{}', false, 0, false, 0, "
                "CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
            )
        )
    upgrade_to_head()
    with get_engine().connect() as connection:
        tables = set(inspect(connection).get_table_names())
        kept = connection.execute(text("SELECT id FROM runs")).scalars().all()
    assert "alembic_version" not in tables
    assert {"searches", "search_trials"} <= tables
    assert kept == ["r1"]
    assert bnlab_revision() == head()

    # Optuna now creates its tables and stamps its own alembic_version beside bnlab's.
    storage = optuna.storages.RDBStorage(get_settings().sqlalchemy_url)
    try:
        study = optuna.create_study(study_name="shared", storage=storage)
        study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=2)
        assert len(optuna.load_study(study_name="shared", storage=storage).trials) == 2
    finally:
        storage.engine.dispose()
    upgrade_to_head()  # and bnlab's next migration leaves Optuna's table alone
    assert bnlab_revision() == head()
    with get_engine().connect() as connection:
        optuna_revision = connection.execute(text("SELECT version_num FROM alembic_version")).scalar()
    assert optuna_revision is not None
    assert not optuna_revision.startswith("00")
