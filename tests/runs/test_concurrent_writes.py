"""Concurrent state updates from the API, workers and the reaper: no 'database is locked' on SQLite,
and the same on Postgres (reliability check 18).

What this guards is bnlab's SQLite configuration (WAL, busy_timeout, real transactions that take
the write lock at BEGIN). Driver-level autocommit without that BEGIN fails it (leases break);
pysqlite's legacy defaults also pass, but only because they run reads outside the transaction.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from service.db import session_scope
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
