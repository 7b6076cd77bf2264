"""Concurrent state updates from the API, workers and the reaper: no 'database is locked' on SQLite,
and the same on Postgres (reliability check 18).

What this guards is bnlab's SQLite configuration (WAL, busy_timeout, real transactions that take
the write lock at BEGIN). Driver-level autocommit without that BEGIN fails it (leases break);
pysqlite's legacy defaults also pass, but only because they run reads outside the transaction.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from service import db
from service.config import get_settings
from service.db import get_engine, session_scope
from service.ml.training import EpochMetrics
from service.runs import repository as run_repo
from service.runs.reaper import reap_once
from service.runs.schemas import RunCreate
from tests.conftest import Backend

SECONDS = 3.0
SPEC = RunCreate.model_validate({"dataset": {"name": "synthetic", "limit": 100}})


def api_writer(errors: list[BaseException], stop: threading.Event) -> None:
    while not stop.is_set():
        with session_scope() as session:
            run = run_repo.create_run(session=session, spec=SPEC)
            session.flush()
            if run.id[-1] in "01234567":
                run_repo.request_cancel(session=session, run=run)


def worker_writer(name: str) -> Callable[[list[BaseException], threading.Event], None]:
    def work(errors: list[BaseException], stop: threading.Event) -> None:
        while not stop.is_set():
            with session_scope() as session:
                queued = run_repo.list_runs(session=session, status=None, limit=5, offset=0)[0]
                ids = [run.id for run in queued if run.status == "queued"]
            for run_id in ids:
                with session_scope() as session:
                    lease = run_repo.claim_run(
                        session=session, run_id=run_id, worker=f"{name}/1", time_limit_s=60
                    )
                if lease is None:
                    continue
                for epoch in (1, 2):
                    with session_scope() as session:
                        run_repo.heartbeat(session=session, lease=lease)
                        metrics = EpochMetrics(epoch, 1.0, 0.5, 1.0, 0.5, 0.1)
                        run_repo.record_epoch(
                            session=session, lease=lease, metrics=metrics, training_state=b"x" * 1000
                        )
                with session_scope() as session:
                    run_repo.finish_held_run(
                        session=session, lease=lease, status=run_repo.RunStatus.succeeded
                    )

    return work


def reaper(errors: list[BaseException], stop: threading.Event) -> None:
    while not stop.is_set():
        reap_once()


@pytest.mark.parametrize("backend_fixture", ["sqlite_backend", "postgres_backend"])
def test_api_workers_and_reaper_write_at_once_without_lock_errors(
    backend_fixture: str, request: pytest.FixtureRequest, use_backend: Callable[[Backend], None]
) -> None:
    use_backend(request.getfixturevalue(backend_fixture))
    errors: list[BaseException] = []
    stop = threading.Event()

    def guarded(body: Callable[[list[BaseException], threading.Event], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                body(errors, stop)
            except BaseException as exc:  # collected and asserted on below
                errors.append(exc)
                stop.set()

        return run

    bodies = [api_writer, api_writer, worker_writer("w1"), worker_writer("w2"), reaper]
    threads = [threading.Thread(target=guarded(body)) for body in bodies]
    for thread in threads:
        thread.start()
    time.sleep(SECONDS)
    stop.set()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    with session_scope() as session:
        runs, total = run_repo.list_runs(session=session, status=None, limit=10_000, offset=0)
        finished = [run for run in runs if run.status == "succeeded"]
        assert total > 20, "the threads really did contend"
        assert finished
        for run in finished:
            assert [m.epoch for m in run_repo.list_epoch_metrics(session=session, run_id=run.id)] == [1, 2]


def test_a_read_only_session_never_holds_up_a_writer(
    sqlite_backend: Backend, use_backend: Callable[[Backend], None]
) -> None:
    """Event-stream polls read in read-only sessions: on SQLite they take no write lock, so a write
    commits at once while one is open (with BEGIN IMMEDIATE it would wait out the busy timeout)."""
    use_backend(sqlite_backend)
    with session_scope(read_only=True) as reader:
        run_repo.list_runs(session=reader, status=None, limit=1, offset=0)  # its transaction is open
        started = time.monotonic()
        with session_scope() as writer:
            run_repo.create_run(session=writer, spec=SPEC)
        assert time.monotonic() - started < 1


def test_a_read_only_session_cannot_write_and_its_connection_writes_again_after(
    sqlite_backend: Backend, use_backend: Callable[[Backend], None]
) -> None:
    """A write in a read-only session would fail only now and then (when another writer commits
    between its read and its write); query_only makes it fail every time, so that tests find it."""
    use_backend(sqlite_backend)
    with pytest.raises(OperationalError, match="readonly"), session_scope(read_only=True) as reader:
        run_repo.create_run(session=reader, spec=SPEC)
    with session_scope() as writer:  # the pool hands out the same connection: writable again
        run_repo.create_run(session=writer, spec=SPEC)
    with session_scope(read_only=True) as reader:
        assert run_repo.list_runs(session=reader, status=None, limit=5, offset=0)[1] == 1


def test_a_get_request_reads_while_a_worker_holds_the_write_lock(client: TestClient) -> None:
    """GET requests read in read-only sessions: a dashboard polling an experiment does not hold up
    a worker's writes, nor wait for them. Here the lock is held for two seconds; a request that
    wanted it would have waited that long."""
    database = get_settings().data_dir / "bnlab.db"
    holder = sqlite3.connect(database, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")  # as a worker's transaction does
    release = threading.Timer(2.0, holder.rollback)
    release.start()
    try:
        started = time.monotonic()
        for path in ("/api/v1/runs", "/api/v1/experiments", "/health/ready"):
            assert client.get(path).status_code == 200, path
        assert time.monotonic() - started < 1
    finally:
        release.join()
        holder.close()


def test_worker_training_processes_leave_wal_checkpoints_to_the_main_process(
    sqlite_backend: Backend, use_backend: Callable[[Backend], None], monkeypatch: pytest.MonkeyPatch
) -> None:
    """In a training process no commit checkpoints the write-ahead log (it waited for two fsyncs);
    checkpoint_wal, which the worker's main process calls every second, copies it into the file."""
    monkeypatch.setattr(db, "_training_process", False)  # set back for the tests after this one
    use_backend(sqlite_backend)
    db.configure_for_training_process()
    db.dispose_engines()  # connections opened from now on
    connection = get_engine().raw_connection()
    try:
        assert connection.cursor().execute("PRAGMA wal_autocheckpoint").fetchone() == (0,)
    finally:
        connection.close()
    with session_scope() as session:  # 5 MB: past the 4 MiB at which a commit would checkpoint
        run = run_repo.create_run(session=session, spec=SPEC)
        run_repo.save_artifact(
            session=session, run_id=run.id, weights=bytes(5_000_000), model_config={}, sha256="0" * 64
        )
    database = get_settings().data_dir / "bnlab.db"
    before = database.stat().st_size
    assert before < 1_000_000, "the commit checkpointed the log"
    db.checkpoint_wal()
    assert database.stat().st_size > before + 5_000_000
    db.dispose_engines()  # no connection without checkpoints serves another test


@pytest.mark.parametrize("training_process", [True, False])
@pytest.mark.parametrize("held_s", [0.01, 0.3])
def test_a_writer_waits_for_the_lock_and_keeps_its_busy_timeout(
    held_s: float,
    training_process: bool,
    sqlite_backend: Backend,
    use_backend: Callable[[Backend], None],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A training process tries for the lock every half millisecond at first (SQLite's own wait
    sleeps up to tens of milliseconds past its release), then, held longer, waits as SQLite does, as
    the API's writers do from the start: either way it writes once the lock is free, and its
    connection keeps the busy timeout for everything else."""
    monkeypatch.setattr(db, "_training_process", training_process)
    use_backend(sqlite_backend)
    database = get_settings().data_dir / "bnlab.db"
    holder = sqlite3.connect(database, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    release = threading.Timer(held_s, holder.rollback)
    release.start()
    try:
        started = time.monotonic()
        with session_scope() as writer:
            run_repo.create_run(session=writer, spec=SPEC)
            waited = time.monotonic() - started
            timeout_ms = writer.execute(text("PRAGMA busy_timeout")).scalar_one()
    finally:
        release.join()
        holder.close()
    assert waited >= held_s * 0.9  # it did wait for the holder
    assert timeout_ms == db.SQLITE_BUSY_TIMEOUT_MS
