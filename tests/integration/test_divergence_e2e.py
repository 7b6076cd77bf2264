"""A run that diverges, end to end through real processes (API, Celery worker, broker, database), on
SQLite with the embedded broker and on Postgres with Redis: the epoch whose loss became NaN is stored
and served with null values, the run ends failed saying where it diverged, and an experiment's report
counts its diverged seeds as failed and diverged, with a null mean rather than a number."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.client.test_cli import bnlab, spec_file
from tests.integration.stack import Stack, stack_on

pytestmark = pytest.mark.integration

# Weights 100× their init through three layers without a norm: the logits are ~10⁸ and the first
# SGD steps overflow the weights to NaN (at any learning rate the spec allows).
DIVERGES = {
    "dataset": {"name": "synthetic", "limit": 300},
    "model": {"hidden": [100, 100, 100], "init_scale": 100, "norm": {"kind": "none"}},
    "train": {"epochs": 3, "batch_size": 32, "optimizer": "sgd", "lr": 0.1, "momentum": 0.9},
}


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    folder = tmp_path_factory.mktemp(f"divergence-{request.param}")
    with stack_on(request.param, folder) as running:
        yield running


def test_a_diverged_run_is_recorded_with_nulls_and_ends_failed_saying_where(stack: Stack) -> None:
    run_id = stack.submit({"name": "diverges", **DIVERGES})
    run = stack.wait_for(run_id, {"succeeded", "failed"})
    assert run["status"] == "failed", stack.tail_logs()
    assert run["error"].startswith("diverged: the loss became non-finite at epoch 1 "), run["error"]
    assert "IntegrityError" not in stack.tail_logs()
    # The epoch is there, its non-finite values null (SQLite and Postgres alike), and training stopped.
    epochs = stack.client.get(f"/api/v1/runs/{run_id}/metrics").json()["epochs"]
    assert [e["epoch"] for e in epochs] == [1]
    assert epochs[0]["train_loss"] is None
    assert epochs[0]["val_loss"] is None
    assert epochs[0]["seconds"] > 0
    summary = run["summary"]
    assert summary["epochs_done"] == 1
    assert summary["val_loss"] is None
    # The layer statistics of the NaN network are null too; the initial network's are numbers.
    stats = stack.client.get(f"/api/v1/runs/{run_id}/layer-stats").json()["epochs"]
    assert [e["epoch"] for e in stats] == [0, 1]
    assert all(isinstance(s["input_std"], float) for s in stats[0]["layers"])
    assert any(s["input_mean"] is None for s in stats[1]["layers"])
    assert stack.client.get(f"/api/v1/runs/{run_id}/plot.png?metric=loss").status_code == 200
    assert stack.client.get(f"/api/v1/runs/{run_id}/plot.png?metric=activations").status_code == 200
    # No model was stored: there is nothing to predict with.
    assert (
        stack.client.post(f"/api/v1/runs/{run_id}/predict", json={"inputs": [[0.0] * 784]}).status_code == 409
    )


def test_the_cli_follows_a_diverging_run_to_its_failure(stack: Stack, tmp_path: Path) -> None:
    result = bnlab(stack, "submit", spec_file(tmp_path, {"name": "cli-diverges", **DIVERGES}), "--wait")
    assert result.returncode == 1, result.stdout + result.stderr  # a run waited for failed
    lines = [line for line in result.stdout.splitlines() if line.startswith("cli-diverges")]
    assert "epoch 1/3  loss -  val_loss -" in lines[-2], lines  # null losses print as "-"
    assert "failed: diverged: the loss became non-finite at epoch 1 " in lines[-1], lines


def wait_finished(stack: Stack, experiment_id: str, timeout: float = 240) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body: dict[str, Any] = stack.client.get(f"/api/v1/experiments/{experiment_id}").json()
        if body["finished"]:
            return body
        time.sleep(0.5)
    raise AssertionError(f"experiment {experiment_id} unfinished after {timeout}s\n{stack.tail_logs()}")


def test_an_experiment_report_counts_diverged_seeds_and_gives_no_mean_for_them(stack: Stack) -> None:
    experiment = {
        "name": "divergence",
        "base": {**DIVERGES, "train": {**DIVERGES["train"], "epochs": 2}},
        "grid": {"model.init_scale": [1, 100]},
        "seeds": [0, 1],
        "target": 0.5,
    }
    submitted = stack.client.post("/api/v1/experiments", json=experiment)
    assert submitted.status_code == 202, submitted.text
    wait_finished(stack, submitted.json()["id"])
    report = stack.client.get(f"/api/v1/experiments/{submitted.json()['id']}/report").json()
    stable, exploding = sorted(report["configurations"], key=lambda c: c["grid_point"]["model.init_scale"])
    assert (stable["succeeded"], stable["failed"], stable["diverged"]) == (2, 0, 0), stack.tail_logs()
    assert stable["final"]["val_loss"]["mean"] is not None
    assert (exploding["succeeded"], exploding["failed"], exploding["diverged"]) == (0, 2, 2)
    for section in ("final", "best"):
        assert exploding[section]["val_loss"] == {"mean": None, "std": None, "n": 2, "values": [None, None]}
    assert all(w["config"] == stable["config"] for w in report["winners"])
