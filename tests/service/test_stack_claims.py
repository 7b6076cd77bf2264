"""Which queued runs a worker claims to train stacked with the run it was handed (runner.claim_stack),
on SQLite and Postgres: the same run but for its seed, fresh, of the same experiment, in the share
that keeps the worker's other training processes busy."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from service.db import session_scope
from service.experiments import repository as experiment_repo
from service.ml.training import EpochMetrics
from service.runs import repository as run_repo
from service.runs import runner
from tests.conftest import Backend

BASE: dict[str, Any] = {"dataset": {"name": "synthetic", "limit": 200}, "model": {"hidden": [32]}}


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest) -> Backend:
    return request.getfixturevalue(f"{request.param}_backend")  # type: ignore[no-any-return]


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a training process of `make run`: stacking needs one thread
    yield
    torch.set_num_threads(threads)


Configure = Callable[..., None]


@pytest.fixture
def configure(backend: Backend, use_backend: Callable[[Backend], None]) -> Configure:
    def apply(**settings: str) -> None:
        use_backend(
            Backend(backend.name, backend.env | {f"BNLAB_{k.upper()}": v for k, v in settings.items()})
        )

    return apply


def experiment_runs(specs: list[dict[str, Any]]) -> list[str]:
    """One experiment holding a queued run per spec, created in this order."""
    with session_scope() as session:
        experiment = experiment_repo.create_experiment(
            session=session, name="e", spec={}, preset=None, owner=None
        )
        ids = []
        for spec in specs:
            run = experiment_repo.add_run(
                session=session,
                experiment_id=experiment.id,
                spec=runner.RunCreate.model_validate(spec),
                grid_point={},
                owner=None,
            )
            session.flush()
            ids.append(run.id)
    return ids


def seeds(spec: dict[str, Any], count: int) -> list[dict[str, Any]]:
    return [{**spec, "train": {**spec.get("train", {}), "seed": seed}} for seed in range(count)]


def claim_with_partners(run_id: str, process: int = 1) -> list[str]:
    """Claim `run_id` as training process `process` of a worker would, then its stack partners; their ids."""
    with session_scope() as session:
        spec = runner.RunCreate.model_validate(run_repo.get_run_spec(session=session, run_id=run_id))
        lease = run_repo.claim_run(session=session, run_id=run_id, worker=f"node/{process}", time_limit_s=60)
        assert lease is not None
        partners = runner.claim_stack(lease, spec, 60, session=session)
    return [partner.run_id for partner, _ in partners]


def status_of(run_id: str) -> str:
    with session_scope() as session:
        run = run_repo.get_run(session=session, run_id=run_id)
        assert run is not None
        return run.status


def test_with_as_many_groups_as_processes_a_run_takes_its_whole_group(configure: Configure) -> None:
    configure(worker_concurrency="2", stack_runs="8")
    other_lr = {**BASE, "train": {"lr": 0.01}}
    ids = experiment_runs(seeds(BASE, 4) + seeds(other_lr, 4))
    assert claim_with_partners(ids[0]) == ids[1:4]  # the same spec but the seed; not the other lr
    assert {status_of(run_id) for run_id in ids[1:4]} == {"running"}
    assert {status_of(run_id) for run_id in ids[4:]} == {"queued"}
    # The other process takes the other group whole: this one is busy with the first.
    assert claim_with_partners(ids[4], process=2) == ids[5:]


def test_a_group_left_for_two_idle_processes_is_split_between_them(configure: Configure) -> None:
    configure(worker_concurrency="2", stack_runs="8")
    other_lr = {**BASE, "train": {"lr": 0.01}}
    ids = experiment_runs(seeds(BASE, 4) + seeds(other_lr, 4))
    with session_scope() as session:  # the first group went elsewhere (another node)
        for run_id in ids[:4]:
            assert run_repo.claim_run(session=session, run_id=run_id, worker="other/1", time_limit_s=60)
    assert claim_with_partners(ids[4]) == ids[5:6]


def test_fewer_groups_than_processes_are_split_among_them(configure: Configure) -> None:
    configure(worker_concurrency="2", stack_runs="8")
    ids = experiment_runs(seeds(BASE, 8))
    assert claim_with_partners(ids[0]) == ids[1:4]  # half of the 8 for this process
    assert claim_with_partners(ids[4], process=2) == ids[5:8]  # the rest for the other, now the only idle one


def test_a_stack_holds_at_most_bnlab_stack_runs(configure: Configure) -> None:
    configure(worker_concurrency="1", stack_runs="3")
    ids = experiment_runs(seeds(BASE, 6))
    assert claim_with_partners(ids[0]) == ids[1:3]


def test_by_default_every_run_trains_alone(configure: Configure) -> None:
    configure(worker_concurrency="1")  # BNLAB_STACK_RUNS=1: stacking measured no faster here
    ids = experiment_runs(seeds(BASE, 3))
    assert claim_with_partners(ids[0]) == []


def test_runs_with_a_checkpoint_resume_alone_and_are_not_taken(configure: Configure) -> None:
    configure(worker_concurrency="1", stack_runs="8")
    ids = experiment_runs(seeds(BASE, 3))
    with session_scope() as session:  # the second run trained an epoch, then went back to the queue
        lease = run_repo.claim_run(session=session, run_id=ids[1], worker="gone/1", time_limit_s=60)
        assert lease is not None
        run_repo.record_epoch(
            session=session,
            lease=lease,
            metrics=EpochMetrics(1, 1.0, 0.5, 1.0, 0.5, 0.1),
            training_state=b"x",
        )
        assert run_repo.release_held_run(session=session, lease=lease)
    assert status_of(ids[1]) == "queued"
    assert claim_with_partners(ids[0]) == [ids[2]]


def test_runs_that_cannot_train_stacked_or_have_no_experiment_train_alone(configure: Configure) -> None:
    configure(worker_concurrency="1", stack_runs="8")
    tanh = experiment_runs(seeds({**BASE, "model": {"hidden": [32], "activation": "tanh"}}, 3))
    assert claim_with_partners(tanh[0]) == []
    with session_scope() as session:
        lone = run_repo.create_run(session=session, spec=runner.RunCreate.model_validate(BASE)).id
    experiment_runs(seeds(BASE, 3))
    assert claim_with_partners(lone) == []
