"""The normalizers that came after BN, end to end through real processes (API, Celery worker, broker,
database): each trains a few epochs on a Fashion-MNIST subset, stores its metrics, and predicts in
eval mode a sample alone exactly as inside a batch of 64, fused where it folds.

Runs on SQLite with the embedded folder broker and on Postgres with Redis, as test_end_to_end.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from tests.integration.stack import Stack, stack_on

pytestmark = pytest.mark.integration

FASHION = {"name": "fashion-mnist", "limit": 1500, "val_split": 0.2}
CNN = {"arch": "cnn", "channels": [8, 16]}
# (name, model, learning rate, validation accuracy it must beat after 3 epochs, served fused). Chance
# is 0.1; the bars sit well under what each reached here (frn-cnn 0.54, frn-mlp 0.60, ws-cnn 0.46,
# noisy 0.78, weighed 0.78). The small CNN learns slowly on 1200 samples, hence its larger rate. FRN and
# example weighing normalise each input by its own statistics: they are served unfused.
CASES: list[tuple[str, dict[str, Any], float, float, bool]] = [
    ("frn-cnn", {**CNN, "norm": {"kind": "frn"}}, 0.01, 0.3, False),
    ("frn-mlp", {"hidden": [64], "norm": {"kind": "frn"}}, 0.001, 0.4, False),
    ("ws-cnn", {**CNN, "norm": {"kind": "ws"}}, 0.01, 0.3, True),
    ("noisy-mlp", {"hidden": [64], "norm": {"kind": "noisy_batch"}}, 0.001, 0.5, True),
    ("weighed-mlp", {"hidden": [64], "norm": {"kind": "batch", "example_weight": 0.05}}, 0.001, 0.5, False),
]


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with stack_on(request.param, tmp_path_factory.mktemp(request.param)) as running:
        yield running


def test_each_new_normalizer_trains_and_predicts_a_sample_alone_as_in_a_batch(stack: Stack) -> None:
    ids = {
        name: stack.submit(
            {
                "name": name,
                "dataset": FASHION,
                "model": model,
                "train": {"epochs": 3, "batch_size": 32, "lr": lr},
            }
        )
        for name, model, lr, _, _ in CASES
    }
    images = np.random.default_rng(0).random((64, 28, 28)).round(4)
    for name, model, _, bar, fused in CASES:
        run = stack.wait_for(ids[name], {"succeeded", "failed"}, timeout=300)
        assert run["status"] == "succeeded", (name, run["error"], stack.tail_logs())
        assert run["spec"]["model"]["norm"]["kind"] == model["norm"]["kind"]
        epochs = stack.client.get(f"/api/v1/runs/{ids[name]}/metrics").json()["epochs"]
        assert [e["epoch"] for e in epochs] == [1, 2, 3]
        assert epochs[-1]["train_loss"] < epochs[0]["train_loss"], (name, epochs)
        assert epochs[-1]["val_accuracy"] > bar, (name, epochs)
        many = predict(stack, ids[name], images)
        one = predict(stack, ids[name], images[:1])
        assert many["fused"] is fused, (name, many)
        assert many["mode"] == "eval"
        assert one["predictions"][0] == many["predictions"][0]
        np.testing.assert_allclose(one["probabilities"][0], many["probabilities"][0], atol=1e-6)
        again = predict(stack, ids[name], images)  # eval mode: no noise, no statistics updated
        assert again["probabilities"] == many["probabilities"]


def predict(stack: Stack, run_id: str, images: np.ndarray) -> dict[str, Any]:
    response = stack.client.post(f"/api/v1/runs/{run_id}/predict", json={"inputs": images.tolist()})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body
