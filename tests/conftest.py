"""Shared fixtures: isolated settings per test, and the real-service backends.

Postgres (127.0.0.1:5432, trust auth, database `test`) and Redis (127.0.0.1:6379) must be running:
`.ci/run` starts them. A test that needs them fails when they are down; nothing is skipped.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest
import redis
from fastapi.testclient import TestClient

from service.config import get_settings
from service.db import dispose_engines
from service.main import create_app
from service.migrate import upgrade_to_head
from service.queue import producer_app
from service.searches.storage import dispose_storages

POSTGRES_ADMIN_URL = os.environ.get("BNLAB_TEST_POSTGRES_ADMIN", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("BNLAB_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@dataclass
class Backend:
    """Environment variables that point bnlab at one database + broker pair."""

    name: str
    env: dict[str, str] = field(default_factory=dict)


def clear_setting_caches() -> None:
    get_settings.cache_clear()
    producer_app.cache_clear()
    dispose_engines()  # before a test's database is dropped: no pooled connection outlives it
    dispose_storages()  # Optuna's, for searches


# What the suite's bnlab processes add to it: one torch thread per training process. On 2 cores shared
# with anything else, a process of two OpenMP threads spin-waits for its descheduled twin: beside two
# busy processes, 125 steps of a small MLP took 16 s instead of 0.1 s (0.19 s on one thread), and a CI
# run's kill -9 drill outlived its four minutes. The tests check what bnlab does, not how fast it
# trains; tests/runs/test_cores.py covers how the worker sizes its threads.
ONE_TORCH_THREAD = {"BNLAB_TORCH_THREADS": "1"}


def bnlab_free_environ() -> dict[str, str]:
    """The current environment without any BNLAB_ variable a developer may have exported."""
    return {k: v for k, v in os.environ.items() if not k.startswith("BNLAB_")}


def sqlite_backend_at(folder: Path) -> Backend:
    """SQLite in `folder` and the embedded folder broker: what `make run` uses."""
    return Backend("sqlite", {"BNLAB_DATA_DIR": str(folder / "data")})


@contextmanager
def postgres_backend_at(folder: Path) -> Iterator[Backend]:
    """A fresh Postgres database and a fresh Redis queue name, removed afterwards."""
    database = f"bnlab_test_{uuid.uuid4().hex[:12]}"
    queue = f"bnlab-test-{uuid.uuid4().hex[:12]}"
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=5) as admin:
        admin.execute(f'CREATE DATABASE "{database}"')
    base = POSTGRES_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
    try:
        yield Backend(
            "postgres",
            {
                "BNLAB_DATA_DIR": str(folder / "data"),
                "BNLAB_DATABASE_URL": f"{base}/{database}",
                "BNLAB_BROKER_URL": REDIS_URL,
                "BNLAB_QUEUE": queue,
            },
        )
    finally:
        client = redis.Redis.from_url(REDIS_URL)
        client.delete(queue)
        client.close()
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=5) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


@pytest.fixture
def sqlite_backend(tmp_path: Path) -> Backend:
    return sqlite_backend_at(tmp_path)


@pytest.fixture
def postgres_backend(tmp_path: Path) -> Iterator[Backend]:
    with postgres_backend_at(tmp_path) as backend:
        yield backend


@pytest.fixture
def use_backend(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[Backend], None]]:
    """Point this process's settings at a backend (for in-process API tests) and migrate it."""

    def apply(backend: Backend) -> None:
        for key in [k for k in os.environ if k.startswith("BNLAB_")]:
            monkeypatch.delenv(key)
        for key, value in backend.env.items():
            monkeypatch.setenv(key, value)
        clear_setting_caches()
        get_settings().data_dir.mkdir(parents=True, exist_ok=True)
        upgrade_to_head()

    yield apply
    clear_setting_caches()


@pytest.fixture
def client(sqlite_backend: Backend, use_backend: Callable[[Backend], None]) -> Iterator[TestClient]:
    use_backend(sqlite_backend)
    with TestClient(create_app()) as test_client:
        yield test_client
