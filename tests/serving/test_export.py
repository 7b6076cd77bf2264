"""Downloads: safetensors weights, the config, and ONNX checked by running it in onnxruntime."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime
import pytest
import safetensors.torch
import torch
from fastapi.testclient import TestClient

from service.ml import checkpoints, datasets
from tests.serving.conftest import stored_model


def test_weights_and_config_downloads(client: TestClient, bn_run: str) -> None:
    weights = client.get(f"/api/v1/runs/{bn_run}/versions/1/weights.safetensors")
    assert weights.status_code == 200
    assert weights.headers["content-type"] == "application/octet-stream"
    assert f'filename="{bn_run}-v1.safetensors"' in weights.headers["content-disposition"]
    assert weights.headers["etag"] == f'"{checkpoints.sha256_hex(weights.content)}"'
    tensors = safetensors.torch.load(weights.content)
    assert torch.equal(tensors["bn1.running_var"], stored_model(bn_run).get_submodule("bn1").running_var)  # type: ignore[arg-type]
    model, config = checkpoints.load_checkpoint(weights.content)  # it carries its own config
    assert config.hidden == (32,)

    latest = client.get(f"/api/v1/runs/{bn_run}/versions/latest/config.json")
    body = json.loads(latest.content)
    assert (body["run_id"], body["version"], body["sha256"]) == (
        bn_run,
        1,
        checkpoints.sha256_hex(weights.content),
    )
    assert body["model_config"]["norm"]["kind"] == "batch"
    assert "attachment" in latest.headers["content-disposition"]

    assert client.get(f"/api/v1/runs/{bn_run}/versions/2/weights.safetensors").status_code == 404
    assert client.get(f"/api/v1/runs/{bn_run}/versions/0/weights.safetensors").status_code == 422
    assert client.get(f"/api/v1/runs/{bn_run}/versions/..%2F..%2Fetc/config.json").status_code in (404, 422)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_onnx_export_runs_in_onnxruntime_like_pytorch(client: TestClient, bn_run: str, fused: bool) -> None:
    response = client.get(f"/api/v1/runs/{bn_run}/versions/latest/model.onnx", params={"fused": fused})
    assert response.status_code == 200, response.text
    assert response.headers["x-bnlab-fused"] == str(fused).lower()
    session = onnxruntime.InferenceSession(response.content, providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input"]
    assert [o.name for o in session.get_outputs()] == ["logits"]
    x = datasets.to_inputs(datasets.make_synthetic(37, seed=3).x)  # any batch size: the batch dim is dynamic
    (logits,) = session.run(None, {"input": x.numpy()})
    with torch.inference_mode():
        expected = stored_model(bn_run).eval()(x).numpy()  # the unfused PyTorch model, from the database
    np.testing.assert_allclose(logits, expected, atol=1e-5)
    graph_ops = {node.op_type for node in onnx.load_from_string(response.content).graph.node}
    assert ("BatchNormalization" in graph_ops) is not fused


def test_onnx_of_a_run_without_a_model_is_409(client: TestClient) -> None:
    queued = client.post("/api/v1/runs", json={"dataset": {"name": "synthetic", "limit": 200}}).json()["id"]
    assert client.get(f"/api/v1/runs/{queued}/versions/latest/model.onnx").status_code == 409
