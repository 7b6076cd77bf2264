"""Deleting a run while a real worker trains it: the worker stops, and nothing of the run comes back.

Runs on SQLite with the embedded broker and on Postgres with Redis, through real processes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import pytest
from sqlalchemy import func, select

from service.db import get_engine, session_scope
from service.models import EpochMetric, LayerStat, ModelArtifact, Run, RunCheckpoint
from tests.conftest import Backend, postgres_backend_at, sqlite_backend_at
from tests.integration.stack import Stack, start_stack

pytestmark = pytest.mark.integration

LONG = {
    "name": "long",
    "dataset": {"name": "synthetic", "limit": 1500, "val_split": 0.2},
    "model": {"hidden": [64]},
    "train": {"epochs": 500, "batch_size": 32},
}


@pytest.fixture(params=["sqlite", "postgres"])
def stack(
    request: pytest.FixtureRequest, tmp_path: Path, use_backend: Callable[[Backend], None]
) -> Iterator[Stack]:
    backends: AbstractContextManager[Backend] = (
        postgres_backend_at(tmp_path)
        if request.param == "postgres"
        else nullcontext(sqlite_backend_at(tmp_path))
    )
    with backends as backend, start_stack(backend, tmp_path / "logs") as running:
        use_backend(backend)  # this process reads the same database, to look for leftover rows
        yield running
        get_engine().dispose()


def rows_of(run_id: str) -> int:
    with session_scope() as session:
        return sum(
            session.scalar(select(func.count()).select_from(table).where(table.run_id == run_id)) or 0
            for table in (EpochMetric, LayerStat, RunCheckpoint, ModelArtifact)
        ) + (session.scalar(select(func.count()).select_from(Run).where(Run.id == run_id)) or 0)


def test_deleting_a_running_run_stops_the_worker_and_leaves_no_rows(stack: Stack) -> None:
    run_id = stack.submit(LONG)
    deadline = time.monotonic() + 120
    while stack.run(run_id)["summary"]["epochs_done"] < 2:  # training, with a checkpoint stored
        assert time.monotonic() < deadline, stack.tail_logs()
        time.sleep(0.1)
    assert stack.client.delete(f"/api/v1/runs/{run_id}").status_code == 204
    deadline = time.monotonic() + 60
    while "was deleted while it trained" not in (stack.logs / "worker.log").read_text():
        assert time.monotonic() < deadline, stack.tail_logs()
        time.sleep(0.2)
    # The worker is free again (one training process): the next run trains to its end.
    follow_up = stack.submit(LONG | {"train": {"epochs": 1}})
    assert stack.wait_for(follow_up, {"succeeded", "failed"})["status"] == "succeeded"
    assert rows_of(run_id) == 0
    assert stack.client.get(f"/api/v1/runs/{run_id}").status_code == 404
