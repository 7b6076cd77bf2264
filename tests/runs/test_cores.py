"""A run that trains alone gets the node's idle cores; runs side by side keep one share each."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from service.db import session_scope
from service.ml.config import ModelConfig, NormConfig, TrainConfig
from service.models import RunStatus
from service.runs import cores
from service.runs import repository as run_repo
from service.runs.schemas import RunCreate
from tests.conftest import Backend

CNN = ModelConfig(arch="cnn", channels=(32, 64))
ARTICLE = ModelConfig(norm=NormConfig(kind="batch"))


@pytest.fixture
def four_cores(
    sqlite_backend: Backend, use_backend: Callable[[Backend], None], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Settings as make run's on a 4-core machine: four training processes, one thread each."""
    monkeypatch.setattr(cores.os, "cpu_count", lambda: 4)
    use_backend(Backend(sqlite_backend.name, sqlite_backend.env | {"BNLAB_WORKER_CONCURRENCY": "4"}))


@pytest.fixture(autouse=True)
def keep_threads() -> object:
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def add_run(status: RunStatus, worker: str | None = None, processes: int = 1) -> None:
    spec = RunCreate.model_validate({"train": {"processes": processes}})
    with session_scope() as session:
        run = run_repo.create_run(session=session, spec=spec)
        run.status, run.worker = status.value, worker


@pytest.mark.usefixtures("four_cores")
@pytest.mark.parametrize(("demand", "threads"), [(0, 4), (1, 4), (2, 2), (3, 1), (4, 1), (9, 1)])
def test_the_cores_are_divided_among_the_runs_that_want_them(demand: int, threads: int) -> None:
    assert cores.threads_for(demand) == threads


def test_only_models_whose_steps_are_large_ask_for_more_threads(
    sqlite_backend: Backend, use_backend: Callable[[Backend], None]
) -> None:
    use_backend(sqlite_backend)
    assert cores.CoreShare.for_run("node/1", CNN, TrainConfig(batch_size=64)).wants_more
    # The article's MLP: about 20 MFLOP a step; a second thread only adds its synchronisation.
    assert not cores.CoreShare.for_run("node/1", ARTICLE, TrainConfig(batch_size=32)).wants_more


def test_a_set_thread_count_is_left_alone(
    sqlite_backend: Backend, use_backend: Callable[[Backend], None]
) -> None:
    use_backend(Backend(sqlite_backend.name, sqlite_backend.env | {"BNLAB_TORCH_THREADS": "1"}))
    assert not cores.CoreShare.for_run("node/1", CNN, TrainConfig(batch_size=64)).wants_more


@pytest.mark.usefixtures("four_cores")
def test_a_lone_run_takes_the_idle_cores_and_gives_them_back_when_others_arrive() -> None:
    add_run(RunStatus.running, "node-a/10")  # this run
    add_run(RunStatus.running, "node-b/20")  # another node's: its cores are not ours
    add_run(RunStatus.succeeded, "node-a/11")
    share = cores.CoreShare.for_run("node-a/10", CNN, TrainConfig(batch_size=64))
    with session_scope() as session:
        share.resize(session)
    assert torch.get_num_threads() == 4

    add_run(RunStatus.queued)  # an idle training process of this node will claim it at once
    share.checked_at = float("-inf")  # as if RESIZE_INTERVAL_S had passed
    with session_scope() as session:
        share.resize(session)
    assert torch.get_num_threads() == 2

    share.restore()
    assert torch.get_num_threads() == 1  # the process's own share, for its next run


@pytest.mark.usefixtures("four_cores")
def test_a_data_parallel_run_on_the_node_counts_each_of_its_processes() -> None:
    add_run(RunStatus.running, "node-a/10")  # this run
    add_run(RunStatus.running, "node-a/11", processes=2)  # its two ranks use two of the four cores
    share = cores.CoreShare.for_run("node-a/10", CNN, TrainConfig(batch_size=64))
    with session_scope() as session:
        assert run_repo.count_training_demand(session=session, node="node-a", enough=4) == 3
        share.resize(session)
    assert torch.get_num_threads() == 1  # four cores among three processes: one each
