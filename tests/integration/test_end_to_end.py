"""End to end through real processes: the API (uvicorn), a Celery worker, a broker and a database.

Every test here runs twice: on SQLite with the embedded folder broker (what `make run` uses) and on
Postgres with Redis (what docker-compose uses).
"""

from __future__ import annotations

import gzip
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.integration.stack import Stack, stack_on

pytestmark = pytest.mark.integration

SYNTHETIC = {"name": "synthetic", "limit": 1500, "val_split": 0.2}


def spec(norm: str, **train: Any) -> dict[str, Any]:
    return {
        "name": f"synthetic-{norm}",
        "dataset": SYNTHETIC,
        "model": {"hidden": [64], "norm": {"kind": norm}},
        "train": {"epochs": 2, "batch_size": 32, **train},
    }


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    folder = tmp_path_factory.mktemp(request.param)
    write_corrupt_mnist(folder / "data" / "mnist")
    with stack_on(request.param, folder) as running:
        yield running


def write_corrupt_mnist(folder: Path) -> None:
    """IDX files whose image file has the wrong magic number: found at submit, rejected by the worker."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(struct.pack(">IIII", 1234, 1, 28, 28)))
    (folder / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(struct.pack(">II", 2049, 1) + b"\x00"))


def test_bn_and_no_bn_runs_train_store_metrics_and_predict(stack: Stack) -> None:
    ids = {norm: stack.submit(spec(norm)) for norm in ("batch", "none")}
    for norm, run_id in ids.items():
        run = stack.wait_for(run_id, {"succeeded", "failed"})
        assert run["status"] == "succeeded", run["error"]
        assert run["spec"]["model"]["norm"]["kind"] == norm
        assert run["started_at"] is not None
        assert run["finished_at"] >= run["started_at"]
        epochs = stack.client.get(f"/api/v1/runs/{run_id}/metrics").json()["epochs"]
        assert [e["epoch"] for e in epochs] == [1, 2]
        assert all(0 < e["train_seconds"] < e["seconds"] for e in epochs)
        assert all(e["train_samples"] == 1200 for e in epochs)  # 1500 samples, 20 % held out
        assert epochs[-1]["val_accuracy"] > 0.5, epochs  # ten classes: chance is 0.1
        assert run["summary"]["epochs_done"] == 2
        assert run["summary"]["val_accuracy"] == epochs[-1]["val_accuracy"]
        # Internal covariate shift, measured: the slot's input per epoch, from the initial network on.
        probed = stack.client.get(f"/api/v1/runs/{run_id}/layer-stats").json()
        assert [(e["epoch"], [s["layer"] for s in e["layers"]]) for e in probed["epochs"]] == [
            (0, ["bn1"]),
            (1, ["bn1"]),
            (2, ["bn1"]),
        ]
        assert all(s["input_std"] > 0 for e in probed["epochs"] for s in e["layers"])


def test_prediction_runs_in_eval_mode_batch_of_one_equals_inside_a_batch(stack: Stack) -> None:
    run_id = stack.submit(spec("batch"))
    assert stack.wait_for(run_id, {"succeeded", "failed"})["status"] == "succeeded"
    rng = np.random.default_rng(0)
    batch = rng.random((64, 784)).round(4)
    many = stack.client.post(f"/api/v1/runs/{run_id}/predict", json={"inputs": batch.tolist()}).json()
    one = stack.client.post(f"/api/v1/runs/{run_id}/predict", json={"inputs": batch[:1].tolist()}).json()
    assert len(many["predictions"]) == 64
    assert one["predictions"][0] == many["predictions"][0]
    np.testing.assert_allclose(one["probabilities"][0], many["probabilities"][0], atol=1e-6)
    np.testing.assert_allclose(np.sum(many["probabilities"], axis=1), 1.0, atol=1e-5)
    square = stack.client.post(
        f"/api/v1/runs/{run_id}/predict", json={"inputs": batch[:2].reshape(2, 28, 28).tolist()}
    ).json()
    assert square["predictions"] == many["predictions"][:2]


@pytest.mark.parametrize(
    ("inputs", "fragment"),
    [
        ([[0.5] * 783], "N×784"),
        ([[[0.5] * 28] * 27], "N×28×28"),
        ([[0.5] * 784, [0.5] * 10], "rectangular"),
        ([[2.0] * 784], "[0, 1]"),
        ([["a"] * 784], "numbers"),
    ],
)
def test_predict_rejects_bad_inputs_with_the_expected_shape(stack: Stack, inputs: Any, fragment: str) -> None:
    run_id = stack.submit(spec("batch", epochs=1))
    assert stack.wait_for(run_id, {"succeeded", "failed"})["status"] == "succeeded"
    response = stack.client.post(f"/api/v1/runs/{run_id}/predict", json={"inputs": inputs})
    assert response.status_code == 422
    assert fragment in response.text


def test_predict_rejects_non_finite_values(stack: Stack) -> None:
    run_id = stack.submit(spec("none", epochs=1))
    assert stack.wait_for(run_id, {"succeeded", "failed"})["status"] == "succeeded"
    body = '{"inputs": [[' + ", ".join(["NaN"] + ["0.5"] * 783) + "]]}"
    response = stack.client.post(
        f"/api/v1/runs/{run_id}/predict", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 422
    assert "finite" in response.text


def test_cancel_running_and_queued_runs(stack: Stack) -> None:
    long_run = stack.submit(spec("batch", epochs=500))
    waiting = stack.submit(spec("none", epochs=500))
    stack.wait_for(long_run, {"running"})
    assert stack.client.post(f"/api/v1/runs/{waiting}/cancel").json()["status"] == "cancelled"
    flagged = stack.client.post(f"/api/v1/runs/{long_run}/cancel").json()
    assert flagged["cancel_requested"] is True
    ended = stack.wait_for(long_run, {"cancelled", "succeeded", "failed"}, timeout=30)
    assert ended["status"] == "cancelled"
    assert ended["summary"]["epochs_done"] < 500
    assert stack.client.post(f"/api/v1/runs/{long_run}/cancel").status_code == 409
    # The queued run never starts, although its message is still delivered to the worker.
    follow_up = stack.submit(spec("none", epochs=1))
    stack.wait_for(follow_up, {"succeeded", "failed"})
    never = stack.run(waiting)
    assert never["status"] == "cancelled"
    assert never["started_at"] is None


def test_a_run_that_raises_ends_failed_with_the_error_text(stack: Stack) -> None:
    run_id = stack.submit({"dataset": {"name": "mnist"}, "train": {"epochs": 1}})
    run = stack.wait_for(run_id, {"succeeded", "failed"})
    assert run["status"] == "failed"
    assert "magic" in run["error"]
    assert "train-images-idx3-ubyte" in run["error"]
    assert (
        stack.client.post(f"/api/v1/runs/{run_id}/predict", json={"inputs": [[0.0] * 784]}).status_code == 409
    )


def test_fashion_mnist_from_the_debian_package(stack: Stack) -> None:
    run_id = stack.submit(
        {"dataset": {"name": "fashion-mnist", "limit": 3000}, "train": {"epochs": 1}, "name": "fashion-small"}
    )
    run = stack.wait_for(run_id, {"succeeded", "failed"})
    assert run["status"] == "succeeded", run["error"]
    assert run["summary"]["val_accuracy"] > 0.6


@pytest.mark.parametrize("stack", ["sqlite"], indirect=True)  # SQLite's write-ahead log
def test_the_worker_checkpoints_the_log_its_training_processes_leave(stack: Stack) -> None:
    """On SQLite a training process's commits never copy the write-ahead log into the database file
    (that waited for two fsyncs); the worker's main process does, every second: the model a run
    stored reaches the file though nothing commits after it."""
    database = stack.data_dir / "bnlab.db"
    wide = {"name": "wide", "dataset": SYNTHETIC, "model": {"hidden": [1024, 1024]}, "train": {"epochs": 1}}
    run_id = stack.submit(wide)  # weights of 7.4 MB
    assert stack.wait_for(run_id, {"succeeded", "failed"})["status"] == "succeeded"
    size = stack.client.get(f"/api/v1/runs/{run_id}/versions").json()["items"][0]["size_bytes"]
    deadline = time.monotonic() + 10
    while database.stat().st_size < size and time.monotonic() < deadline:
        time.sleep(0.2)
    assert database.stat().st_size >= size
