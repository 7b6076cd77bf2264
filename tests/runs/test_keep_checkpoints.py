"""BNLAB_KEEP_CHECKPOINTS: each epoch's training state is stored (epoch, the default) or none is
(final: only a succeeded run's model); either way a run that has ended keeps no checkpoint.
On SQLite and Postgres, through the worker's own callbacks and runner."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import timedelta

import pytest
from sqlalchemy import func, select

from service.db import get_engine, session_scope
from service.ml.training import EpochMetrics
from service.models import ModelArtifact, RunCheckpoint, RunStatus, utcnow
from service.runs import repository as run_repo
from service.runs import runner
from service.runs.schemas import RunCreate
from tests.conftest import Backend

SPEC = {"dataset": {"name": "synthetic", "limit": 200}, "model": {"hidden": [16]}, "train": {"epochs": 2}}


@pytest.fixture(params=["sqlite", "postgres"])
def configure(
    request: pytest.FixtureRequest, use_backend: Callable[[Backend], None]
) -> Iterator[Callable[[str], None]]:
    backend: Backend = request.getfixturevalue(f"{request.param}_backend")

    def apply(keep: str) -> None:
        use_backend(Backend(backend.name, backend.env | {"BNLAB_KEEP_CHECKPOINTS": keep}))

    yield apply
    get_engine().dispose()  # before the Postgres database is dropped


def claimed_run() -> run_repo.Lease:
    with session_scope() as session:
        run = run_repo.create_run(session=session, spec=RunCreate.model_validate(SPEC))
    with session_scope() as session:
        lease = run_repo.claim_run(session=session, run_id=run.id, worker="node/1", time_limit_s=600)
    assert lease is not None
    return lease


def checkpoints_of(run_id: str) -> int:
    with session_scope() as session:
        query = select(func.count()).select_from(RunCheckpoint).where(RunCheckpoint.run_id == run_id)
        return session.scalar(query) or 0


def end_epoch(lease: run_repo.Lease, epoch: int = 1, final_epoch: int | None = None) -> list[int]:
    """What training does after an epoch; returns how often the training state was serialised."""
    calls: list[int] = []

    def snapshot() -> bytes:
        calls.append(1)
        return b"state"

    callbacks = runner.DatabaseCallbacks(lease, 600, final_epoch=final_epoch)
    callbacks.on_epoch_end(EpochMetrics(epoch, 0.5, 0.8, 0.6, 0.7, 0.1), snapshot)
    return calls


def test_by_default_each_epoch_stores_the_state_to_resume_from(configure: Callable[[str], None]) -> None:
    configure("epoch")
    lease = claimed_run()
    assert end_epoch(lease) == [1]
    assert checkpoints_of(lease.run_id) == 1


def test_the_last_epoch_stores_no_state_and_a_crash_after_it_resumes_from_the_one_before(
    configure: Callable[[str], None],
) -> None:
    configure("epoch")
    lease = claimed_run()
    assert end_epoch(lease, epoch=1, final_epoch=2) == [1]
    assert end_epoch(lease, epoch=2, final_epoch=2) == []  # the run's success would delete it at once
    with session_scope() as session:
        checkpoint = run_repo.resume_point(session=session, run_id=lease.run_id)
        assert checkpoint is not None
        assert checkpoint.epoch == 1
        run = run_repo.get_run(session=session, run_id=lease.run_id)
        assert run is not None
        assert run.epochs_done == 1, "epoch 2 is trained again"
        stored = run_repo.list_epoch_metrics(session=session, run_id=lease.run_id)
        assert [row.epoch for row in stored] == [1]


def test_final_stores_no_training_state_and_the_model_all_the_same(configure: Callable[[str], None]) -> None:
    configure("final")
    lease = claimed_run()
    assert end_epoch(lease) == []  # not even serialised
    assert checkpoints_of(lease.run_id) == 0
    with session_scope() as session:
        fresh = run_repo.create_run(session=session, spec=RunCreate.model_validate(SPEC)).id
    assert runner.execute_run(fresh, worker="node/2") == RunStatus.succeeded
    with session_scope() as session:
        assert (
            session.scalar(
                select(func.count()).select_from(ModelArtifact).where(ModelArtifact.run_id == fresh)
            )
            == 1
        )


def test_runs_that_end_any_way_keep_no_checkpoint(configure: Callable[[str], None]) -> None:
    configure("epoch")
    orphan = claimed_run()
    end_epoch(orphan)
    with session_scope() as session:
        run = run_repo.get_run(session=session, run_id=orphan.run_id)
        assert run is not None
        run.heartbeat_at = utcnow() - timedelta(hours=1)
        session.flush()
        assert run_repo.fail_orphan(session=session, run=run, error="lost")
    assert checkpoints_of(orphan.run_id) == 0
    handed_back = claimed_run()
    end_epoch(handed_back)
    with session_scope() as session:
        assert run_repo.release_held_run(session=session, lease=handed_back)
    with session_scope() as session:
        run = run_repo.get_run(session=session, run_id=handed_back.run_id)
        assert run is not None
        run_repo.request_cancel(session=session, run=run)
    assert checkpoints_of(handed_back.run_id) == 0
