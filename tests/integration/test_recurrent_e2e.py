"""The rnn arch end to end (docs/deep-lab.md, Recurrent networks): an LSTM with recurrent BN and a GRU
with layer norm train on sequential Fashion-MNIST (each image read as 28 steps of 28 pixels) through
the real API and a Celery worker, record their probes on the cells' norm slots, and serve in eval mode
a sample alone as inside a batch of 64, unfused (their norms sit inside the cells).

Runs on SQLite with the embedded broker and on Postgres with Redis, as every end-to-end test."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from tests.integration.stack import Stack, stack_on

pytestmark = pytest.mark.integration

RNNS: dict[str, dict[str, Any]] = {
    "lstm-recurrent-bn": {
        "arch": "rnn",
        "cell": "lstm",
        "hidden_size": 32,
        "norm": {"kind": "batch", "momentum": 0.1},
    },
    "gru-layer-norm": {"arch": "rnn", "cell": "gru", "hidden_size": 32, "norm": {"kind": "layer"}},
}


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    folder = tmp_path_factory.mktemp(request.param)
    with stack_on(request.param, folder) as running:
        yield running


@pytest.mark.timeout(600)
def test_rnns_train_on_sequential_fashion_mnist_and_predict_in_eval_mode(stack: Stack) -> None:
    ids = {
        name: stack.submit(
            {
                "name": name,
                "dataset": {"name": "fashion-mnist", "limit": 500, "val_split": 0.2},
                "model": model,
                "train": {"epochs": 3, "batch_size": 32, "lr": 0.02, "probes": {"statistics_gap": True}},
            }
        )
        for name, model in RNNS.items()
    }
    batch = np.random.default_rng(0).random((64, 784)).round(4)
    for name, run_id in ids.items():
        run = stack.wait_for(run_id, {"succeeded", "failed"}, timeout=400)
        assert run["status"] == "succeeded", (name, run["error"])
        epochs = stack.client.get(f"/api/v1/runs/{run_id}/metrics").json()["epochs"]
        assert [e["epoch"] for e in epochs] == [1, 2, 3]
        # It learns: the training loss falls and held-out accuracy in eval mode beats chance (0.1).
        assert epochs[2]["train_loss"] < epochs[0]["train_loss"], (name, epochs)
        assert epochs[2]["val_accuracy"] > 0.25, (name, epochs)
        many = stack.client.post(f"/api/v1/runs/{run_id}/predict", json={"inputs": batch.tolist()}).json()
        one = stack.client.post(f"/api/v1/runs/{run_id}/predict", json={"inputs": batch[5:6].tolist()}).json()
        assert one["predictions"][0] == many["predictions"][5], name
        np.testing.assert_allclose(one["probabilities"][0], many["probabilities"][5], atol=1e-5)
        assert many["fused"] is False, name
        # The probes find the cells' slots: the input product, the hidden product (and an LSTM's cell state).
        layers = stack.client.get(f"/api/v1/runs/{run_id}/layer-stats").json()["epochs"][0]["layers"]
        slots = {"cell1.bn1", "cell1.bn2"} | ({"cell1.bn3"} if "lstm" in name else set())
        assert {s["layer"] for s in layers} == slots, name
    gradients = stack.client.get(f"/api/v1/runs/{ids['lstm-recurrent-bn']}/probes/gradients").json()
    assert gradients["epochs"], gradients


@pytest.mark.timeout(600)
def test_the_cooijmans_card_runs_at_the_test_scale(stack: Stack) -> None:
    """The replication card of recurrent BN (LSTM: recurrent BN vs layer norm vs none) runs through the
    worker at the test scale and reports a verdict per claim (its wiring, not its claims)."""
    started = stack.client.post("/api/v1/cards/cooijmans-2016", json={"scale": "test"})
    assert started.status_code == 202, started.text
    deadline = time.monotonic() + 400
    report = stack.client.get("/api/v1/cards/cooijmans-2016/report").json()
    while not report["finished"] and time.monotonic() < deadline:
        time.sleep(1)
        report = stack.client.get("/api/v1/cards/cooijmans-2016/report").json()
    assert report["finished"], report
    assert report["runs"]["succeeded"] == 6, stack.tail_logs()  # 3 norms × 2 seeds
    assert {c["verdict"] for c in report["claims"]} <= {"supported", "contradicted", "inconclusive"}
    assert len(report["claims"]) == 2
