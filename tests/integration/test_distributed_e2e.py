"""A data-parallel run through real processes (API, Celery worker, SQLite and the folder broker): the
worker trains `train.processes: 2` with `model.norm.sync: true` in two spawned gloo processes, and the
run's metrics are those of the same spec trained in one process over the global batch."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import sqlite_backend_at
from tests.integration.stack import Stack, start_stack

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    folder = tmp_path_factory.mktemp("distributed")
    with start_stack(sqlite_backend_at(folder), folder / "logs") as running:
        yield running


def spec(processes: int) -> dict[str, Any]:
    # SGD: Adam would magnify the float32 rounding that differs between one process and two.
    return {
        "dataset": {"name": "synthetic", "limit": 400, "val_split": 0.2},
        "model": {"hidden": [32], "norm": {"sync": processes > 1}},
        "train": {"epochs": 2, "batch_size": 32, "optimizer": "sgd", "lr": 0.1, "processes": processes},
    }


def epochs_of(stack: Stack, run_id: str) -> list[dict[str, Any]]:
    run = stack.wait_for(run_id, {"succeeded", "failed"})
    assert run["status"] == "succeeded", f"{run['error']}\n{stack.tail_logs()}"
    epochs: list[dict[str, Any]] = stack.client.get(f"/api/v1/runs/{run_id}/metrics").json()["epochs"]
    return epochs


def test_two_synced_processes_report_the_single_process_runs_metrics_and_serve(stack: Stack) -> None:
    one_id, two_id = (stack.submit(spec(p)) for p in (1, 2))
    single, synced = epochs_of(stack, one_id), epochs_of(stack, two_id)
    assert [e["epoch"] for e in synced] == [1, 2]
    for got, want in zip(synced, single, strict=True):
        for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"):
            assert got[key] == pytest.approx(want[key], rel=1e-4), key
    # The stored network is plain BN and serves like the single-process one (eval: running statistics).
    inputs = {"inputs": [[i / 783 for i in range(784)], [0.5] * 784]}
    answers = [stack.client.post(f"/api/v1/runs/{i}/predict", json=inputs) for i in (one_id, two_id)]
    assert [a.status_code for a in answers] == [200, 200], answers[1].text
    one, two = (a.json()["probabilities"] for a in answers)
    assert two == [pytest.approx(row, abs=1e-4) for row in one]
