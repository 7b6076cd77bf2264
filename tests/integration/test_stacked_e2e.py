"""Stacked training end to end: a worker with one thread per training process (as `make run`) trains
an experiment's seeds of one configuration together, and every run comes out exactly as it does
submitted alone: the same metrics and the same stored weights, bit for bit. A cancelled
experiment's stacked runs end cancelled. On SQLite with the embedded broker and on Postgres + Redis."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import safetensors.torch
import torch

from tests.integration.stack import Stack, stack_on
from tests.integration.test_experiments_e2e import wait_finished

pytestmark = pytest.mark.integration

# Two training processes of one thread each (what `make run` starts on this 2-core machine), stacking on.
ONE_THREAD_EACH = {"BNLAB_WORKER_CONCURRENCY": "2", "BNLAB_TORCH_THREADS": "1", "BNLAB_STACK_RUNS": "8"}
EXPERIMENT = {
    "name": "stacked",
    "base": {
        "dataset": {"name": "synthetic", "limit": 600},
        "model": {"hidden": [32]},
        "train": {"epochs": 2, "batch_size": 32},
    },
    "grid": {"model.norm.kind": ["batch", "none"]},
    "seeds": [0, 1, 2, 3],
}


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    folder = tmp_path_factory.mktemp(f"stacked-{request.param}")
    with stack_on(request.param, folder, ONE_THREAD_EACH) as running:
        yield running


def stacked_log_lines(stack: Stack) -> list[str]:
    return [line for line in (stack.logs / "worker.log").read_text().splitlines() if "trains stacked" in line]


def stored_weights(stack: Stack, run_id: str) -> dict[str, torch.Tensor]:
    response = stack.client.get(f"/api/v1/runs/{run_id}/versions/1/weights.safetensors")
    assert response.status_code == 200, response.text
    return safetensors.torch.load(response.content)


def epochs_of(stack: Stack, run_id: str) -> list[dict[str, Any]]:
    epochs = stack.client.get(f"/api/v1/runs/{run_id}/metrics").json()["epochs"]
    keys = ("epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy")
    return [{k: e[k] for k in keys} for e in epochs]


def test_an_experiments_seeds_train_stacked_and_equal_the_runs_alone(stack: Stack) -> None:
    before = len(stacked_log_lines(stack))
    submitted = stack.client.post("/api/v1/experiments", json=EXPERIMENT)
    assert submitted.status_code == 202, submitted.text
    experiment = wait_finished(stack, submitted.json()["id"])
    assert experiment["status_counts"]["succeeded"] == 8, stack.tail_logs()
    assert len(stacked_log_lines(stack)) > before, stack.tail_logs()  # some runs did train stacked

    for run in experiment["runs"]:
        spec = stack.client.get(f"/api/v1/runs/{run['id']}").json()["spec"]
        alone_id = stack.submit(spec)  # not part of an experiment: it trains alone
        stack.wait_for(alone_id, {"succeeded", "failed"})
        assert epochs_of(stack, run["id"]) == epochs_of(stack, alone_id), run
        # Tensor by tensor: the files' bytes may differ, safetensors writes its header in hash order.
        stacked_weights, alone_weights = stored_weights(stack, run["id"]), stored_weights(stack, alone_id)
        assert stacked_weights.keys() == alone_weights.keys()
        for name, tensor in stacked_weights.items():
            assert torch.equal(tensor, alone_weights[name]), (run, name)


def test_a_cancelled_experiments_stacked_runs_end_cancelled(stack: Stack) -> None:
    long = {
        **EXPERIMENT,
        "name": "stacked-cancel",
        "grid": {"model.norm.kind": ["batch"]},
        "base": {**EXPERIMENT["base"], "train": {"epochs": 500, "batch_size": 32}},  # type: ignore[dict-item]
    }
    before = len(stacked_log_lines(stack))
    submitted = stack.client.post("/api/v1/experiments", json=long)
    assert submitted.status_code == 202, submitted.text
    experiment_id = submitted.json()["id"]
    deadline = time.monotonic() + 60
    while len(stacked_log_lines(stack)) == before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(stacked_log_lines(stack)) > before, stack.tail_logs()
    cancelled = stack.client.post(f"/api/v1/experiments/{experiment_id}/cancel")
    assert cancelled.status_code == 200, cancelled.text
    experiment = wait_finished(stack, experiment_id, timeout=60)
    assert experiment["status_counts"]["cancelled"] == 4, (experiment["status_counts"], stack.tail_logs())
