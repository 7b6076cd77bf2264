"""Engine and session factory. One engine per process: never share one across a fork."""

from __future__ import annotations

import os
import sqlite3
import time
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

# How this process's SQLite connections behave: as the API's (the default), or as a worker's training
# process's (configure_for_training_process).
_training_process = False


def configure_for_training_process() -> None:
    """This process trains runs, one at a time, beside a few others like it (a worker's pool
    processes): its SQLite connections, from now on, never checkpoint the write-ahead log on commit,
    and poll for the write lock.

    The checkpoint (two fsyncs) runs in whichever commit takes the log past 1,000 pages (4 MiB): in a
    grid of small runs, the commit storing a run's model, every second or third run, 15 ms on average
    against 2.8 ms without (bench/train.py --grid's runs, in process). Another process must call
    checkpoint_wal often instead (a worker's main process does, every WAL_CHECKPOINT_INTERVAL_S), or
    the log grows with every write. The lock: see _take_write_lock."""
    global _training_process
    _training_process = True


def checkpoint_wal() -> None:
    """Copy the write-ahead log's committed pages into the SQLite database file, as far as readers
    allow (PASSIVE: it waits for no reader or writer). SQLite only: its caller checks the database."""
    connection = get_engine().raw_connection()  # autocommit: the pragma cannot run in a transaction
    try:
        connection.cursor().execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
    finally:
        connection.close()


def _configure_sqlite(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets the API read while a worker writes; busy_timeout waits for a lock instead of failing.
    # The driver's own transaction handling is switched off: _begin_immediate below takes over.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    if _training_process:
        cursor.execute("PRAGMA wal_autocheckpoint=0")
    cursor.close()


# Execution option of a session that only reads (session_scope(read_only=True)).
READ_ONLY = "bnlab_read_only"
# Key in a pooled SQLite connection's info: its query_only pragma as last set.
QUERY_ONLY = "bnlab_query_only"


def _begin_immediate(connection: Connection) -> None:
    # A WAL transaction that reads and then writes fails at once with "database is locked" if
    # another writer committed in between, busy_timeout or not. Taking the write lock at BEGIN
    # makes concurrent transactions wait their turn (up to busy_timeout) instead.
    # A read-only session begins deferred: in WAL mode it reads a snapshot without the write lock,
    # so the many polls of open event streams never hold up a writer (nor wait for one).
    # A read-only session also cannot write (query_only): a write there would surface as a rare
    # "database is locked" under load, so it fails at once, in every test that reaches it, instead.
    read_only = bool(connection.get_execution_options().get(READ_ONLY))
    info = connection.connection.info  # the pooled connection's: the pragma outlives this session
    if info.get(QUERY_ONLY, False) != read_only:
        connection.exec_driver_sql(f"PRAGMA query_only={int(read_only)}")
        info[QUERY_ONLY] = read_only
    if read_only:
        connection.exec_driver_sql("BEGIN")
    elif _training_process:
        _take_write_lock(connection)
    else:
        connection.exec_driver_sql("BEGIN IMMEDIATE")


# SQLite's own wait for a lock (busy_timeout) sleeps 1, 2, 5, 10, 15 … ms between its tries: a
# training process that found the lock taken by another's commit for a few milliseconds slept 8 or
# 18 ms, not until it was free (in a grid of small runs: waits of 9-10 ms on average). A training
# process first tries every WRITE_LOCK_POLL_S for WRITE_LOCK_POLLS tries, then waits as SQLite does.
# Only there: the API's threads can be dozens of writers at once, for whom SQLite's backing off
# spares the interpreter lock that the one holding the database lock needs.
WRITE_LOCK_POLL_S = 0.0005
WRITE_LOCK_POLLS = 40


def _take_write_lock(connection: Connection) -> None:
    driver = connection.connection.driver_connection
    assert isinstance(driver, sqlite3.Connection)
    driver.execute("PRAGMA busy_timeout=0")
    try:
        for _ in range(WRITE_LOCK_POLLS):
            try:
                driver.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if exc.sqlite_errorcode & 0xFF != sqlite3.SQLITE_BUSY:
                    break  # not the lock: the BEGIN below raises it as SQLAlchemy's error
            time.sleep(WRITE_LOCK_POLL_S)
    finally:
        driver.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    connection.exec_driver_sql("BEGIN IMMEDIATE")  # held longer: wait as SQLite does


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
