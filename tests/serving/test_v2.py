"""The Open Inference Protocol routes against real trained models (peers.md, KServe V2 shapes)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.ml import datasets
from tests.serving.conftest import BN_SPEC, oracle_probabilities, store_trained_run

SAMPLES = datasets.make_synthetic(4, seed=7).x.numpy()  # uint8 [4, 28, 28]
PIXELS = SAMPLES.astype(np.float64) / 255.0


def infer_body(data: Any, shape: list[int], datatype: str = "FP32", **extra: Any) -> dict[str, Any]:
    return {"inputs": [{"name": "input", "shape": shape, "datatype": datatype, "data": data}], **extra}


def outputs(response_json: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {o["name"]: o for o in response_json["outputs"]}


def test_health_and_server_metadata(client: TestClient) -> None:
    assert client.get("/v2/health/live").json() == {"live": True}
    ready = client.get("/v2/health/ready")
    assert (ready.status_code, ready.json()) == (200, {"ready": True})
    assert client.get("/v2").json()["name"] == "bnlab"


def test_model_metadata_names_inputs_outputs_versions_and_fusion(client: TestClient, bn_run: str) -> None:
    meta = client.get(f"/v2/models/{bn_run}").json()
    assert meta["name"] == bn_run
    assert meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 28, 28]}]
    assert [o["name"] for o in meta["outputs"]] == ["probabilities", "predictions"]
    assert meta["outputs"][0]["shape"] == [-1, 10]
    params = meta["parameters"]
    assert params["fused"] is True
    assert params["folded"] == [
        {"batch_norm": "bn1", "into": "out"}
    ]  # after_activation: into the NEXT Linear
    assert params["input_datatypes"] == ["FP32", "FP64", "UINT8"]
    assert client.get(f"/v2/models/{bn_run}/versions/1").json()["parameters"]["version"] == "1"
    assert client.get(f"/v2/models/{bn_run}/ready").json() == {"name": bn_run, "ready": True}


def test_model_that_cannot_fold_is_served_unfused_and_says_why(client: TestClient) -> None:
    spec = BN_SPEC | {"model": {"hidden": [32], "norm": {"kind": "batch", "track_running_stats": False}}}
    run_id = store_trained_run(spec)
    params = client.get(f"/v2/models/{run_id}").json()["parameters"]
    assert params["fused"] is False
    assert "track_running_stats" in params["not_fused_because"]
    body = infer_body(PIXELS.reshape(-1).tolist(), [4, 784])
    answer = client.post(f"/v2/models/{run_id}/infer", json=body).json()
    assert answer["parameters"]["fused"] is False
    assert outputs(answer)["probabilities"]["shape"] == [4, 10]


@pytest.mark.parametrize(
    ("datatype", "data", "shape"),
    [
        ("FP32", PIXELS.reshape(-1).tolist(), [4, 784]),  # flat
        ("FP32", PIXELS.tolist(), [4, 28, 28]),  # nested
        ("FP64", PIXELS.reshape(4, 1, 28, 28).tolist(), [4, 1, 28, 28]),
        ("UINT8", SAMPLES.reshape(-1).tolist(), [4, 1, 28, 28]),
    ],
    ids=["fp32-flat", "fp32-nested", "fp64-nested-4d", "uint8-flat"],
)
def test_infer_agrees_with_predict_for_every_encoding(
    client: TestClient, bn_run: str, datatype: str, data: list[Any], shape: list[int]
) -> None:
    expected = oracle_probabilities(bn_run, PIXELS)
    response = client.post(f"/v2/models/{bn_run}/infer", json=infer_body(data, shape, datatype, id="req-7"))
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["model_name"], body["model_version"], body["id"]) == (bn_run, "1", "req-7")
    probs = outputs(body)["probabilities"]
    assert (probs["datatype"], probs["shape"]) == ("FP32", [4, 10])
    np.testing.assert_allclose(np.reshape(probs["data"], (4, 10)), expected, atol=1e-6)
    predictions = outputs(body)["predictions"]
    assert (predictions["datatype"], predictions["shape"]) == ("INT64", [4])
    assert predictions["data"] == np.argmax(expected, axis=1).tolist()


def test_requested_outputs_and_unfused(client: TestClient, bn_run: str) -> None:
    body = infer_body(PIXELS.reshape(-1).tolist(), [4, 784], outputs=[{"name": "predictions"}])
    answer = client.post(f"/v2/models/{bn_run}/infer", json=body).json()
    assert [o["name"] for o in answer["outputs"]] == ["predictions"]
    fused = client.post(f"/v2/models/{bn_run}/infer", json=infer_body(PIXELS.reshape(-1).tolist(), [4, 784]))
    unfused = client.post(
        f"/v2/models/{bn_run}/infer?fused=false", json=infer_body(PIXELS.reshape(-1).tolist(), [4, 784])
    )
    assert (fused.json()["parameters"]["fused"], unfused.json()["parameters"]["fused"]) == (True, False)
    np.testing.assert_allclose(
        outputs(fused.json())["probabilities"]["data"],
        outputs(unfused.json())["probabilities"]["data"],
        atol=1e-5,
    )


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (infer_body([0.5] * 3, [1, 3]), "sample shape"),
        (infer_body([0.5] * 784, [2, 784]), "needs 1568"),
        (infer_body([0.5] * 784, [1, 784], "INT32"), "datatype INT32"),
        (infer_body([[0.5] * 784, [0.5] * 3], [2, 784]), "ragged"),
        (infer_body([[0.5] * 392] * 2, [1, 784]), "not the declared shape"),
        (infer_body([2.0] * 784, [1, 784]), "[0, 1]"),
        (infer_body([256] * 784, [1, 784], "UINT8"), "[0, 255]"),
        (infer_body([0.5] * 784, [1, 784], "UINT8"), "integers"),
        (infer_body(["a"] * 784, [1, 784]), "numbers"),
        (infer_body([0.5] * 783 + [True], [1, 784]), "true/false are not numbers"),
        (infer_body([[0.5] * 783 + [False]], [1, 784]), "true/false are not numbers"),
        (infer_body([0.5] * 784, [0, 784]), "batch dimension"),
        (infer_body([0.5] * 784, [1, 784], outputs=[{"name": "logits"}]), "unknown output"),
        (
            {"inputs": [{"name": "x", "shape": [1, 784], "datatype": "FP32", "data": [0.5] * 784}]},
            "unknown input",
        ),
        ({"inputs": []}, "inputs"),
        ({"inputs": [{"name": "input"}]}, "Field required"),
        (
            {"inputs": [{"name": "input", "shape": [1], "datatype": "FP32", "data": [], "colour": 1}]},
            "colour",
        ),
    ],
)
def test_bad_requests_are_400_with_an_error_message(
    client: TestClient, bn_run: str, body: dict[str, Any], fragment: str
) -> None:
    response = client.post(f"/v2/models/{bn_run}/infer", json=body)
    assert response.status_code == 400, response.text
    assert set(response.json()) == {"error"}
    assert fragment in response.json()["error"]


def test_malformed_json_nan_and_bad_query_are_400(client: TestClient, bn_run: str) -> None:
    for content in (
        b"{",
        b"[]",
        b"null",
        b'{"inputs": [{"name": "input", "shape": [1, 784], "datatype": "FP32"',
    ):
        response = client.post(f"/v2/models/{bn_run}/infer", content=content)
        assert response.status_code == 400, (content, response.text)
        assert "error" in response.json()
    nan_body = b'{"inputs": [{"name": "input", "shape": [1, 1], "datatype": "FP32", "data": [NaN]}]}'
    assert client.post(f"/v2/models/{bn_run}/infer", content=nan_body).status_code == 400
    response = client.post(f"/v2/models/{bn_run}/infer?fused=maybe", json=infer_body([0.5] * 784, [1, 784]))
    assert response.status_code == 400
    assert "fused" in response.json()["error"]


def test_unknown_models_and_versions_are_404_and_bad_names_400(client: TestClient, bn_run: str) -> None:
    body = infer_body([0.5] * 784, [1, 784])
    for path in (f"/v2/models/{'0' * 32}", "/v2/models/no-such-alias", f"/v2/models/{bn_run}/versions/2"):
        assert client.get(path).status_code == 404, path
        assert "error" in client.get(path).json()
        assert client.post(f"{path}/infer", json=body).status_code == 404
    assert client.get(f"/v2/models/{bn_run}/versions/0").status_code == 400
    assert client.get("/v2/models/..%2F..%2Fetc%2Fpasswd").status_code in (400, 404)
    assert client.get("/v2/models/a%20b").status_code == 400


def test_ready_is_400_for_a_run_without_a_model_yet(client: TestClient) -> None:
    queued = client.post("/api/v1/runs", json=BN_SPEC).json()["id"]
    response = client.get(f"/v2/models/{queued}/ready")
    assert (response.status_code, response.json()) == (400, {"name": queued, "ready": False})
    assert client.get(f"/v2/models/{'0' * 32}/ready").status_code == 404
