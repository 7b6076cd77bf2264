"""An experiment end to end through real processes (API, Celery worker, broker, database), once on
SQLite with the embedded broker and once on Postgres with Redis: a small grid trains for real, its
report is recomputed here from each run's stored metrics, its plot comes back, and an alias to the
experiment's best run serves predictions."""

from __future__ import annotations

import io
import statistics
import time
from collections.abc import Iterator
from typing import Any

import pytest
from PIL import Image

from tests.integration.stack import Stack, stack_on

pytestmark = pytest.mark.integration

EXPERIMENT = {
    "name": "e2e",
    "base": {
        "dataset": {"name": "synthetic", "limit": 600},
        "model": {"hidden": [32]},
        "train": {"epochs": 2, "batch_size": 32},
    },
    "grid": {"model.norm.kind": ["none", "batch"]},
    "seeds": [0, 1],
    "target": 0.5,
}


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    folder = tmp_path_factory.mktemp(f"experiments-{request.param}")
    with stack_on(request.param, folder) as running:
        yield running


def wait_finished(stack: Stack, experiment_id: str, timeout: float = 240) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body: dict[str, Any] = stack.client.get(f"/api/v1/experiments/{experiment_id}").json()
        if body["finished"]:
            return body
        time.sleep(0.5)
    raise AssertionError(f"experiment {experiment_id} unfinished after {timeout}s\n{stack.tail_logs()}")


def test_experiment_trains_reports_plots_and_serves_its_best_run(stack: Stack) -> None:
    submitted = stack.client.post("/api/v1/experiments", json=EXPERIMENT)
    assert submitted.status_code == 202, submitted.text
    experiment = wait_finished(stack, submitted.json()["id"])
    assert experiment["status_counts"]["succeeded"] == 4, stack.tail_logs()

    report = stack.client.get(f"/api/v1/experiments/{experiment['id']}/report").json()
    assert report["finished"] is True
    for config in report["configurations"]:
        runs = [r for r in experiment["runs"] if r["config"] == config["config"]]
        assert [r["seed"] for r in runs] == [0, 1]
        epochs = [stack.client.get(f"/api/v1/runs/{r['id']}/metrics").json()["epochs"] for r in runs]
        assert all(len(e) == 2 for e in epochs)
        for metric in ("val_accuracy", "val_loss", "train_loss"):
            finals = [e[-1][metric] for e in epochs]
            assert config["final"][metric]["mean"] == pytest.approx(statistics.fmean(finals), rel=1e-12)
            assert config["final"][metric]["std"] == pytest.approx(statistics.stdev(finals), rel=1e-9)
        best = [max(row["val_accuracy"] for row in e) for e in epochs]
        assert config["best"]["val_accuracy"]["mean"] == pytest.approx(statistics.fmean(best), rel=1e-12)
    # The two seeds of one configuration differ (their own initialisation and data order).
    none_finals = report["configurations"][0]["final"]["val_loss"]["values"]
    assert none_finals[0] != none_finals[1]

    png = stack.client.get(f"/api/v1/experiments/{experiment['id']}/plot.png", params={"metric": "loss"})
    assert png.status_code == 200
    assert png.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(png.content)).size == (800, 500)

    alias = stack.client.put("/api/v1/models/e2e-best", json={"experiment_id": experiment["id"]}).json()
    accuracies = {
        r["id"]: stack.client.get(f"/api/v1/runs/{r['id']}").json()["summary"]["val_accuracy"]
        for r in experiment["runs"]
    }
    assert alias["run_id"] == max(accuracies, key=lambda run_id: accuracies[run_id])
    assert alias["metric_value"] == accuracies[alias["run_id"]]
    infer = {"inputs": [{"name": "input", "shape": [2, 784], "datatype": "FP32", "data": [0.5] * 1568}]}
    answer = stack.client.post("/v2/models/e2e-best/infer", json=infer)
    assert answer.status_code == 200, answer.text
    assert answer.json()["parameters"]["run_id"] == alias["run_id"]
    assert answer.json()["outputs"][0]["shape"] == [2, 10]
