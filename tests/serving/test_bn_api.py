"""BN tools over HTTP: bn-stats, PreciseBN recalibration stored as new versions, and the versions list."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from fastapi.testclient import TestClient

from service.main import create_app
from service.ml import datasets
from service.models import RunStatus
from tests.conftest import Backend
from tests.serving.conftest import BN_SPEC, oracle_probabilities, store_trained_run, stored_model


def test_bn_stats_describe_the_stored_buffers(client: TestClient, bn_run: str) -> None:
    body = client.get(f"/api/v1/runs/{bn_run}/bn-stats", params={"bins": 8}).json()
    assert (body["run_id"], body["version"]) == (bn_run, 1)
    (layer,) = body["layers"]
    bn1 = stored_model(bn_run).get_submodule("bn1")
    assert isinstance(bn1, torch.nn.BatchNorm1d)
    assert bn1.running_var is not None
    assert (layer["name"], layer["num_features"], layer["eps"], layer["momentum"]) == ("bn1", 32, 1e-3, 0.01)
    # 480 training samples, batch 16, 2 epochs: 60 steps, every one counted.
    assert layer["num_batches_tracked"] == int(bn1.num_batches_tracked) == 60  # type: ignore[arg-type]
    running_var = layer["running_var"]
    assert running_var["max"] == bn1.running_var.max().item()
    assert sum(running_var["histogram_counts"]) == 32
    assert len(running_var["histogram_edges"]) == 9
    assert layer["weight"] is not None


def test_recalibration_is_a_new_version_with_accuracy_before_and_after(
    client: TestClient, bn_run: str
) -> None:
    response = client.post(f"/api/v1/runs/{bn_run}/recalibrate", json={"num_batches": 25, "batch_size": 16})
    assert response.status_code == 201, response.text
    recalibration = response.json()
    assert recalibration["version"] == 2
    assert response.headers["location"] == f"/api/v1/runs/{bn_run}/versions/2"
    assert (recalibration["base_version"], recalibration["estimator"]) == (1, "population")
    assert (recalibration["num_batches"], recalibration["samples"]) == (25, 400)
    # 60 EMA steps at momentum 0.01 leave the running statistics near their initial values; the
    # recomputed population statistics describe the trained network, and validation shows it.
    assert recalibration["val_accuracy_after"] > recalibration["val_accuracy_before"]
    before, after = stored_model(bn_run, 1), stored_model(bn_run, 2)
    for name, tensor in before.state_dict().items():
        changed = not torch.equal(tensor, after.state_dict()[name])
        assert changed == name.startswith("bn1.running") or name == "bn1.num_batches_tracked", name
    assert int(after.get_submodule("bn1").num_batches_tracked) == 25  # type: ignore[arg-type]

    versions = client.get(f"/api/v1/runs/{bn_run}/versions").json()["items"]
    assert [v["version"] for v in versions] == [1, 2]
    assert versions[0]["recalibration"] is None
    assert versions[1]["recalibration"]["val_accuracy_after"] == recalibration["val_accuracy_after"]
    # The newest version serves by default; version 1 stays reachable.
    assert client.get(f"/v2/models/{bn_run}").json()["versions"] == ["1", "2"]
    pixels = datasets.make_synthetic(3, seed=5).x.numpy() / 255.0
    newest = client.post(f"/api/v1/runs/{bn_run}/predict", json={"inputs": pixels.tolist()}).json()
    assert newest["model_version"] == 2
    np.testing.assert_allclose(
        newest["probabilities"], oracle_probabilities(bn_run, pixels, version=2), atol=1e-5
    )
    first = client.post(f"/api/v1/runs/{bn_run}/predict?version=1", json={"inputs": pixels.tolist()}).json()
    np.testing.assert_allclose(
        first["probabilities"], oracle_probabilities(bn_run, pixels, version=1), atol=1e-5
    )
    again = client.post(
        f"/api/v1/runs/{bn_run}/recalibrate", json={"estimator": "mean_of_batches", "num_batches": 5}
    )
    assert again.json()["version"] == 3
    assert again.json()["base_version"] == 2


def test_recalibration_refusals(client: TestClient, bn_run: str, no_bn_run: str) -> None:
    no_bn = client.post(f"/api/v1/runs/{no_bn_run}/recalibrate", json={})
    assert no_bn.status_code == 409
    assert "no BatchNorm" in no_bn.json()["detail"]
    too_many = client.post(
        f"/api/v1/runs/{bn_run}/recalibrate", json={"num_batches": 2000, "batch_size": 1024}
    )
    assert too_many.status_code == 409
    assert "training split has 480" in too_many.json()["detail"]
    for body in ({"estimator": "ema"}, {"num_batches": 0}, {"batch_size": 1}, {"seed": -1}, {"extra": 1}):
        assert client.post(f"/api/v1/runs/{bn_run}/recalibrate", json=body).status_code == 422, body
    assert client.post(f"/api/v1/runs/{bn_run}/recalibrate", json={"base_version": 9}).status_code == 404
    queued = store_trained_run(BN_SPEC, status=RunStatus.queued)
    assert client.post(f"/api/v1/runs/{queued}/recalibrate", json={}).status_code == 409
    assert client.get(f"/api/v1/runs/{queued}/bn-stats").status_code == 409
    assert client.get(f"/api/v1/runs/{'0' * 32}/bn-stats").status_code == 404
    assert client.get(f"/api/v1/runs/{no_bn_run}/bn-stats").json()["layers"] == []


def test_serving_on_postgres(postgres_backend: Backend, use_backend: Callable[[Backend], None]) -> None:
    """The same path on the production database: versions, a recalibration's savepoint, aliases, V2."""
    use_backend(postgres_backend)
    with TestClient(create_app()) as client:
        run_id = store_trained_run(BN_SPEC)
        assert client.post(f"/api/v1/runs/{run_id}/recalibrate", json={"num_batches": 5}).status_code == 201
        assert client.put("/api/v1/models/pg-bn", json={"run_id": run_id, "version": 1}).status_code == 201
        body = {"inputs": [{"name": "input", "shape": [1, 784], "datatype": "FP32", "data": [0.5] * 784}]}
        answer = client.post("/v2/models/pg-bn/infer", json=body).json()
        assert (answer["model_version"], answer["parameters"]["run_id"]) == ("1", run_id)
        assert client.get(f"/v2/models/{run_id}").json()["versions"] == ["1", "2"]
