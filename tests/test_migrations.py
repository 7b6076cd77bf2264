"""The schema comes only from Alembic migrations; they must match the SQLAlchemy models exactly."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect

from service.db import get_engine
from service.migrate import alembic_config
from service.models import Base
from tests.conftest import Backend


@pytest.mark.parametrize("backend_fixture", ["sqlite_backend", "postgres_backend"])
def test_migrations_create_exactly_the_models_schema(
    backend_fixture: str, request: pytest.FixtureRequest, use_backend: Callable[[Backend], None]
) -> None:
    use_backend(request.getfixturevalue(backend_fixture))  # runs `alembic upgrade head`
    with get_engine().connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
        tables = set(inspect(connection).get_table_names())
    assert differences == []
    assert {"runs", "epoch_metrics", "model_artifacts", "model_aliases", "recalibrations"} <= tables
    assert "alembic_version" in tables


def test_migrating_twice_is_a_no_op(sqlite_backend: Backend, use_backend: Callable[[Backend], None]) -> None:
    use_backend(sqlite_backend)
    use_backend(sqlite_backend)
    with get_engine().connect() as connection:
        current = MigrationContext.configure(connection).get_current_revision()
    assert current == ScriptDirectory.from_config(alembic_config()).get_current_head()
