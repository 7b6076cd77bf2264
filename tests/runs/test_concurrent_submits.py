"""Many submits at once: every one answered 202 within seconds, on SQLite and on Postgres (issue 20).

A real uvicorn server in this process and 60 clients at once. Before the fix a request's session
held its transaction (SQLite's write lock; a Postgres pooled connection) while FastAPI waited for a
thread to validate its answer, and the other requests, blocked on that lock or connection, held
every thread: nothing moved until SQLite's 15 s busy timeout (28 × 500) or the pool's 30 s timeout.

And when the database really is too busy, the answer is 503 with Retry-After, never 500.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from service.db import SQLITE_BUSY_TIMEOUT_MS, get_engine, session_scope
from service.main import create_app
from service.runs import repository as run_repo
from tests.conftest import Backend
from tests.datasets.test_routes import features, npz_bytes, upload
from tests.integration.stack import free_port

CLIENTS = 60
CAP = 5  # active runs per key in the cap test
SPEC = {"dataset": {"name": "synthetic", "limit": 100}, "train": {"epochs": 1}}
# Below the 15 s busy timeout the old code waited out; far above the ~1 s 60 submits take on 2 quiet
# cores (6 s was seen with the cores shared by a load test and other suites).
SLOWEST_S = SQLITE_BUSY_TIMEOUT_MS / 1000 * 2 / 3
LIFTED_LIMITS = {
    "BNLAB_RATE_LIMIT_PER_MINUTE": "1000000",
    "BNLAB_RATE_LIMIT_BURST": "100000",
    "BNLAB_MAX_ACTIVE_RUNS_PER_KEY": "100000",
}


@contextmanager
def serving(backend: Backend, env: dict[str, str], use_backend: Callable[[Backend], None]) -> Iterator[str]:
    """A real uvicorn server in a thread of this process, on `backend` with `env` added."""
    use_backend(Backend(backend.name, backend.env | env))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        # Close the pooled connections before the backend's database is dropped: left open, they
        # warn (an error here) whenever the engine cache lets the engine go, in some later test.
        get_engine().dispose()


@pytest.fixture
def server_url(request: pytest.FixtureRequest, use_backend: Callable[[Backend], None]) -> Iterator[str]:
    with serving(request.getfixturevalue(request.param), LIFTED_LIMITS, use_backend) as url:
        yield url


@pytest.fixture
def capped_server_url(
    request: pytest.FixtureRequest, use_backend: Callable[[Backend], None]
) -> Iterator[str]:
    env = LIFTED_LIMITS | {"BNLAB_MAX_ACTIVE_RUNS_PER_KEY": str(CAP)}
    with serving(request.getfixturevalue(request.param), env, use_backend) as url:
        yield url


def submit(url: str) -> tuple[int, float]:
    started = time.monotonic()
    response = httpx.post(f"{url}/api/v1/runs", json=SPEC, timeout=60)
    return response.status_code, time.monotonic() - started


@pytest.mark.parametrize("server_url", ["sqlite_backend", "postgres_backend"], indirect=True)
def test_sixty_concurrent_submits_are_all_accepted_within_seconds(server_url: str) -> None:
    barrier = threading.Barrier(CLIENTS)

    def at_once(_: int) -> tuple[int, float]:
        barrier.wait()
        return submit(server_url)

    with ThreadPoolExecutor(CLIENTS) as pool:
        answers = list(pool.map(at_once, range(CLIENTS)))
    codes = sorted({code for code, _ in answers})
    slowest = max(seconds for _, seconds in answers)
    assert codes == [202], f"status codes {codes}, slowest {slowest:.1f} s"
    assert slowest < SLOWEST_S, f"slowest submit took {slowest:.1f} s"
    with session_scope() as session:
        runs, total = run_repo.list_runs(session=session, status=None, limit=1000, offset=0)
        assert total == CLIENTS
        assert all(run.enqueued_at is not None for run in runs), "every run marked as published"


@pytest.mark.parametrize("capped_server_url", ["sqlite_backend", "postgres_backend"], indirect=True)
def test_concurrent_submits_never_pass_the_active_run_cap(capped_server_url: str) -> None:
    """The cap is counted and the row inserted in one transaction; on Postgres two such transactions
    used to overlap (each counted before the other inserted), so a burst could pass the cap."""
    clients = 4 * CAP
    barrier = threading.Barrier(clients)

    def at_once(_: int) -> int:
        barrier.wait()
        return submit(capped_server_url)[0]

    with ThreadPoolExecutor(clients) as pool:
        codes = list(pool.map(at_once, range(clients)))
    assert sorted(set(codes)) == [202, 429], codes
    assert codes.count(202) == CAP, f"{codes.count(202)} accepted, cap {CAP}"
    with session_scope() as session:
        assert run_repo.list_runs(session=session, status=None, limit=100, offset=0)[1] == CAP


def test_an_experiment_on_an_upload_is_published_without_waiting_on_itself(
    sqlite_backend: Backend, use_backend: Callable[[Backend], None]
) -> None:
    """Publishing reads an upload's shape (for the run's time limit) in a session of its own. It used
    to do so while the request's session held SQLite's write lock from noting the previous run
    enqueued: the second run's publish waited out the 15 s busy timeout, then 500."""
    use_backend(sqlite_backend)
    with TestClient(create_app()) as client:
        _, dataset = upload(client, npz_bytes(**features()))
        spec = {
            "name": "on an upload",
            "base": {"dataset": {"name": "uploaded", "id": dataset["id"]}, "train": {"epochs": 1}},
            "seeds": [0, 1, 2],
        }
        started = time.monotonic()
        response = client.post("/api/v1/experiments", json=spec)
        seconds = time.monotonic() - started
    assert response.status_code == 202, response.text
    assert seconds < SLOWEST_S, f"took {seconds:.1f} s"
    with session_scope() as session:
        runs, total = run_repo.list_runs(session=session, status=None, limit=10, offset=0)
        assert total == 3
        assert all(run.enqueued_at is not None for run in runs)


def locked() -> OperationalError:
    return OperationalError("INSERT", {}, sqlite3.OperationalError("database is locked"))


def pool_timeout() -> PoolTimeout:
    return PoolTimeout("QueuePool limit of size 5 overflow 5 reached, connection timed out, timeout 10.00")


@pytest.mark.parametrize("error", [locked, pool_timeout])
def test_a_database_too_busy_answers_503_with_retry_after(
    error: Callable[[], Exception],
    sqlite_backend: Backend,
    use_backend: Callable[[Backend], None],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    use_backend(sqlite_backend)

    def busy(**_: object) -> None:
        raise error()

    monkeypatch.setattr(run_repo, "create_run", busy)
    with TestClient(create_app()) as client:
        response = client.post("/api/v1/runs", json=SPEC)
    assert response.status_code == 503, response.text
    assert response.headers["retry-after"] == "1"
    assert "busy" in response.json()["detail"]


def test_any_other_database_error_stays_a_500(
    sqlite_backend: Backend, use_backend: Callable[[Backend], None], monkeypatch: pytest.MonkeyPatch
) -> None:
    use_backend(sqlite_backend)

    def broken(**_: object) -> None:
        raise OperationalError("INSERT", {}, sqlite3.OperationalError("no such table: run"))

    monkeypatch.setattr(run_repo, "create_run", broken)
    with TestClient(create_app(), raise_server_exceptions=False) as client:
        assert client.post("/api/v1/runs", json=SPEC).status_code == 500
