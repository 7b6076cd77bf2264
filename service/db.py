"""Engine and session factory. One engine per process: never share one across a fork."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from service.config import get_settings

SQLITE_BUSY_TIMEOUT_MS = 15_000
# Seconds a session waits for a pooled connection (SQLAlchemy's default is 30). No code path holds
# one connection while it waits for another and transactions last milliseconds, so a longer wait
# means overload: the API answers 503 with Retry-After (service/api/busy.py) instead of hanging.
POOL_TIMEOUT_S = 10


def _configure_sqlite(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets the API read while a worker writes; busy_timeout waits for a lock instead of failing.
    # The driver's own transaction handling is switched off: _begin_immediate below takes over.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


# Execution option of a session that only reads (session_scope(read_only=True)).
READ_ONLY = "bnlab_read_only"


def _begin_immediate(connection: Connection) -> None:
    # A WAL transaction that reads and then writes fails at once with "database is locked" if
    # another writer committed in between, busy_timeout or not. Taking the write lock at BEGIN
    # makes concurrent transactions wait their turn (up to busy_timeout) instead.
    # A read-only session begins deferred: in WAL mode it reads a snapshot without the write lock,
    # so the many polls of open event streams never hold up a writer (nor wait for one).
    connection.exec_driver_sql(
        "BEGIN" if connection.get_execution_options().get(READ_ONLY) else "BEGIN IMMEDIATE"
    )


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(
            url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}, pool_timeout=POOL_TIMEOUT_S
        )
        event.listen(engine, "connect", _configure_sqlite)
        event.listen(engine, "begin", _begin_immediate)
        return engine
    # Overflow sized from the API's concurrency limit: an admitted request uses one connection at a
    # time, so with one each a request never queues behind others' transactions (64 submits at once
    # took twice as long with 5 + 5). Overflow connections open on demand and close when returned, so
    # a worker, which needs few, never opens them. The API's 5 + 64 fit Postgres' default 100
    # max_connections; raise that with BNLAB_MAX_CONCURRENT_REQUESTS (past it: 503, see api/busy.py).
    # Several API processes (BNLAB_API_PROCESSES) share that budget: each has its share of the
    # overflow, so that together they open no more than one process did.
    settings = get_settings()
    overflow = max(1, settings.max_concurrent_requests // settings.api_process_count)
    return create_engine(
        url, pool_pre_ping=True, pool_size=5, max_overflow=overflow, pool_timeout=POOL_TIMEOUT_S
    )


# One engine per (URL, process): a forked Celery pool child builds its own instead of reusing the
# parent's. Kept in a dict rather than a cache so that dispose_engines can close them all.
_ENGINES: dict[tuple[str, int], Engine] = {}


def _engine_for_process(url: str, pid: int) -> Engine:
    if (url, pid) not in _ENGINES:
        _ENGINES[(url, pid)] = make_engine(url)
    return _ENGINES[(url, pid)]


def dispose_engines() -> None:
    """Close every pooled connection of this process's engines and forget them (a process that
    switches databases, such as the test suite, so that no connection outlives its database)."""
    for engine in _ENGINES.values():
        engine.dispose()
    _ENGINES.clear()
    _session_factory.cache_clear()


def get_engine() -> Engine:
    # Keyed by pid: a forked Celery pool child builds its own engine instead of reusing the parent's.
    return _engine_for_process(get_settings().sqlalchemy_url, os.getpid())


@lru_cache
def _session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(bind=engine, expire_on_commit=False)


def new_session() -> Session:
    return _session_factory(get_engine())()


@contextmanager
def session_scope(*, read_only: bool = False) -> Iterator[Session]:
    """A unit of work for tasks and scripts: commit on success, roll back on error. `read_only`
    (a unit that never writes) takes no write lock on SQLite; Postgres ignores it."""
    session = new_session()
    try:
        if read_only:
            session.connection(execution_options={READ_ONLY: True})
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
