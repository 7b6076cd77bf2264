"""NVIDIA's own tritonclient.http against a real bnlab API (uvicorn on a port, a trained model):
binary tensor data in and out, statistics, and the server metadata that advertises both.

Every answer is compared with bnlab's own /api/v1/runs/{id}/predict on the same pixels.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from fastapi.testclient import TestClient
from tritonclient.utils import InferenceServerException

from service.main import create_app
from service.ml import datasets
from tests.conftest import Backend
from tests.runs.test_concurrent_submits import serving
from tests.serving.conftest import BN_SPEC, store_trained_run

SAMPLES = datasets.make_synthetic(4, seed=11).x.numpy()  # uint8 [4, 28, 28]
PIXELS = SAMPLES.astype(np.float64) / 255.0


@pytest.fixture
def server_url(sqlite_backend: Backend, use_backend: Callable[[Backend], None]) -> Iterator[str]:
    with serving(sqlite_backend, {}, use_backend) as url:
        yield url.removeprefix("http://")  # tritonclient takes host:port


@pytest.fixture
def triton_client(server_url: str) -> Iterator[triton.InferenceServerClient]:
    client = triton.InferenceServerClient(url=server_url)
    yield client
    client.close()


@pytest.fixture
def model(server_url: str) -> str:
    return store_trained_run(BN_SPEC)


def predict(server_url: str, run_id: str) -> np.ndarray:
    """bnlab's own answer for PIXELS: the reference every Triton answer must match."""
    response = httpx.post(
        f"http://{server_url}/api/v1/runs/{run_id}/predict", json={"inputs": PIXELS.tolist()}
    )
    assert response.status_code == 200, response.text
    return np.asarray(response.json()["probabilities"])


def tensor(datatype: str, shape: list[int], *, binary: bool) -> triton.InferInput:
    values = {"FP32": PIXELS.astype(np.float32), "FP64": PIXELS, "UINT8": SAMPLES}[datatype]
    infer_input = triton.InferInput("input", shape, datatype)
    infer_input.set_data_from_numpy(values.reshape(shape), binary_data=binary)
    return infer_input


def requested(*, binary: bool) -> list[triton.InferRequestedOutput]:
    return [
        triton.InferRequestedOutput(name, binary_data=binary) for name in ("probabilities", "predictions")
    ]


def test_server_metadata_advertises_binary_data_and_statistics(
    triton_client: triton.InferenceServerClient,
) -> None:
    metadata = triton_client.get_server_metadata()
    assert metadata["name"] == "bnlab"
    assert set(metadata["extensions"]) == {"binary_tensor_data", "statistics"}


@pytest.mark.parametrize(
    ("datatype", "shape"),
    [("FP32", [4, 784]), ("FP64", [4, 1, 28, 28]), ("UINT8", [4, 28, 28])],
)
def test_binary_inputs_and_outputs_agree_with_predict(
    triton_client: triton.InferenceServerClient, server_url: str, model: str, datatype: str, shape: list[int]
) -> None:
    result = triton_client.infer(
        model, [tensor(datatype, shape, binary=True)], outputs=requested(binary=True), request_id="b-1"
    )
    expected = predict(server_url, model)
    probabilities = result.as_numpy("probabilities")
    assert probabilities is not None
    assert (probabilities.dtype, probabilities.shape) == (np.float32, (4, 10))
    np.testing.assert_allclose(probabilities, expected, atol=1e-6)
    np.testing.assert_array_equal(result.as_numpy("predictions"), expected.argmax(axis=1))
    answer = result.get_response()
    assert (answer["model_name"], answer["model_version"], answer["id"]) == (model, "1", "b-1")
    sizes = {o["name"]: o["parameters"]["binary_data_size"] for o in answer["outputs"]}
    assert sizes == {"probabilities": 4 * 10 * 4, "predictions": 4 * 8}
    assert all("data" not in o for o in answer["outputs"])


def test_json_input_with_binary_outputs_and_binary_input_with_json_outputs(
    triton_client: triton.InferenceServerClient, server_url: str, model: str
) -> None:
    expected = predict(server_url, model)
    json_in = triton_client.infer(
        model, [tensor("FP32", [4, 784], binary=False)], outputs=requested(binary=True)
    )
    binary_in = triton_client.infer(
        model, [tensor("UINT8", [4, 784], binary=True)], outputs=requested(binary=False)
    )
    for result in (json_in, binary_in):
        np.testing.assert_allclose(result.as_numpy("probabilities"), expected, atol=1e-6)
        np.testing.assert_array_equal(result.as_numpy("predictions"), expected.argmax(axis=1))
    assert all("binary_data_size" in o["parameters"] for o in json_in.get_response()["outputs"])
    assert all("data" in o and "parameters" not in o for o in binary_in.get_response()["outputs"])
    # No outputs named: tritonclient asks for every output in binary (binary_data_output).
    everything = triton_client.infer(model, [tensor("FP32", [4, 784], binary=True)])
    np.testing.assert_allclose(everything.as_numpy("probabilities"), expected, atol=1e-6)
    # One binary output and one JSON output in the same answer.
    mixed = triton_client.infer(
        model,
        [tensor("FP64", [4, 784], binary=True)],
        outputs=[
            triton.InferRequestedOutput("predictions", binary_data=False),
            triton.InferRequestedOutput("probabilities", binary_data=True),
        ],
    )
    assert [o["name"] for o in mixed.get_response()["outputs"]] == ["predictions", "probabilities"]
    np.testing.assert_allclose(mixed.as_numpy("probabilities"), expected, atol=1e-6)
    np.testing.assert_array_equal(mixed.as_numpy("predictions"), expected.argmax(axis=1))


def version_stats(client: triton.InferenceServerClient, model: str) -> dict[str, Any]:
    stats: dict[str, Any] = client.get_inference_statistics(model_name=model, model_version="1")
    [stat] = stats["model_stats"]
    assert (stat["name"], stat["version"]) == (model, "1")
    return stat


def test_statistics_count_every_inference(
    triton_client: triton.InferenceServerClient, server_url: str, model: str
) -> None:
    before = version_stats(triton_client, model)
    assert (before["inference_count"], before["execution_count"], before["last_inference"]) == (0, 0, 0)
    started_ms = time.time() * 1000
    for datatype, binary in (("FP32", True), ("UINT8", False), ("FP64", True)):
        triton_client.infer(
            model, [tensor(datatype, [4, 784], binary=binary)], outputs=requested(binary=binary)
        )
    bad = tensor("FP32", [4, 784], binary=True)
    bad.set_data_from_numpy(np.full((4, 784), 2.0, np.float32), binary_data=True)  # not pixels in [0, 1]
    with pytest.raises(InferenceServerException, match=r"\[0, 1\]"):
        triton_client.infer(model, [bad])
    after = version_stats(triton_client, model)
    inference = after["inference_stats"]
    assert after["inference_count"] == 3 * 4  # samples
    assert 1 <= after["execution_count"] <= 3  # micro-batching may join requests
    assert after["last_inference"] >= started_ms - 1000
    assert (inference["success"]["count"], inference["fail"]["count"]) == (3, 1)
    for step in ("success", "queue", "compute_input", "compute_infer", "compute_output"):
        assert inference[step]["count"] == 3, step
        assert inference[step]["ns"] > 0, step
    assert inference["success"]["ns"] >= inference["compute_infer"]["ns"]
    assert inference["cache_hit"] == {"count": 0, "ns": 0}
    assert sum(b["compute_infer"]["count"] for b in after["batch_stats"]) == after["execution_count"]
    assert all(b["batch_size"] % 4 == 0 for b in after["batch_stats"])
    # Every version of the model, and every model this process has served.
    assert [s["version"] for s in triton_client.get_inference_statistics(model)["model_stats"]] == ["1"]
    everything = triton_client.get_inference_statistics()["model_stats"]
    assert [s for s in everything if s["name"] == model] == [after]
    # An alias reports its run's statistics under its own name.
    httpx.put(f"http://{server_url}/api/v1/models/counted", json={"run_id": model}).raise_for_status()
    [aliased] = triton_client.get_inference_statistics("counted")["model_stats"]
    assert aliased == after | {"name": "counted"}
    with pytest.raises(InferenceServerException, match="no model named"):
        triton_client.get_inference_statistics("no-such-model")
    with pytest.raises(InferenceServerException, match="no version 2"):
        triton_client.get_inference_statistics(model, "2")


# -------------------------------------------------------------------- hand-made bad binary requests

ONE_IMAGE = PIXELS[:1].astype("<f4").tobytes()  # 3136 bytes


def header_for(datatype: str = "FP32", size: Any = 3136, *, request: Any = None, **tensor: Any) -> bytes:
    """A JSON header with one binary input; `tensor` and `request` add or replace fields."""
    fields = {
        "name": "input",
        "shape": [1, 784],
        "datatype": datatype,
        "parameters": {"binary_data_size": size},
    }
    return json.dumps({"inputs": [fields | tensor], **(request or {})}).encode()


def framed(header: bytes, tail: bytes) -> tuple[bytes, int]:
    """A body and its Inference-Header-Content-Length."""
    return header + tail, len(header)


def post(
    client: TestClient, run_id: str, body: bytes, length: int | str | None, **headers: str
) -> tuple[int, dict[str, Any]]:
    if length is not None:
        headers["Inference-Header-Content-Length"] = str(length)
    response = client.post(f"/v2/models/{run_id}/infer", content=body, headers=headers)
    return response.status_code, response.json()


def test_a_hand_made_binary_request_answers_in_binary(client: TestClient, bn_run: str) -> None:
    outputs = [{"name": "predictions", "parameters": {"binary_data": True}}]
    body, length = framed(header_for(request={"outputs": outputs}), ONE_IMAGE)
    response = client.post(
        f"/v2/models/{bn_run}/infer", content=body, headers={"Inference-Header-Content-Length": str(length)}
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/octet-stream"
    header_length = int(response.headers["Inference-Header-Content-Length"])
    answer = json.loads(response.content[:header_length])
    assert answer["outputs"] == [
        {"name": "predictions", "shape": [1], "datatype": "INT64", "parameters": {"binary_data_size": 8}}
    ]
    expected = np.argmax(predict_in_process(client, bn_run, PIXELS[:1]))
    assert np.frombuffer(response.content[header_length:], "<i8").tolist() == [expected]


def predict_in_process(client: TestClient, run_id: str, pixels: np.ndarray) -> np.ndarray:
    response = client.post(f"/api/v1/runs/{run_id}/predict", json={"inputs": pixels.tolist()})
    return np.asarray(response.json()["probabilities"])


BODY = header_for() + ONE_IMAGE
HEADER = len(header_for())
BAD_REQUESTS = {
    "header-not-a-number": (BODY, "12abc", "must be a whole number of bytes; got '12abc'"),
    "header-negative": (BODY, "-5", "must be a whole number of bytes"),
    "header-past-the-body": (BODY, 10**6, "is 1000000, but the body has only"),
    "header-of-5000-digits": (BODY, "9" * 5000, "but the body has only"),
    "header-cuts-the-json": (BODY, 20, "Invalid JSON"),
    "binary-without-header": (BODY, None, "needs the Inference-Header-Content-Length header"),
    "binary-short": (*framed(header_for(), ONE_IMAGE[:-4]), "add up to 3136 bytes, but 3132 bytes follow"),
    "binary-long": (*framed(header_for(), ONE_IMAGE + b"\0"), "but 3137 bytes follow"),
    "size-not-the-shape": (
        *framed(header_for(size=3132), ONE_IMAGE[:-4]),
        "shape [1, 784] of FP32 needs 3136",
    ),
    "fp64-size": (*framed(header_for("FP64"), ONE_IMAGE), "of FP64 needs 6272"),
    "unsupported-datatype": (*framed(header_for("INT16", 1568), ONE_IMAGE[:1568]), "got INT16"),
    "negative-size": (*framed(header_for(size=-1), ONE_IMAGE), "binary_data_size must be a whole number"),
    "boolean-size": (*framed(header_for(size=True), ONE_IMAGE), "binary_data_size must be a whole number"),
    "data-and-binary": (*framed(header_for(data=[0.5] * 784), ONE_IMAGE), "both data and"),
    "nan": (*framed(header_for(), np.full(784, np.nan, "<f4").tobytes()), "finite"),
    "not-pixels": (*framed(header_for(), np.full(784, 2.0, "<f4").tobytes()), "[0, 1]"),
    "no-data": (*framed(header_for(parameters=None), b""), "data: Field required"),
    "flag-not-a-boolean": (
        *framed(header_for(request={"parameters": {"binary_data_output": "yes"}}), ONE_IMAGE),
        "binary_data_output must be true or false",
    ),
}


@pytest.mark.parametrize(("body", "length", "fragment"), BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_inconsistent_binary_requests_are_400_with_a_message(
    client: TestClient, bn_run: str, body: bytes, length: int | str | None, fragment: str
) -> None:
    status, answer = post(client, bn_run, body, length)
    assert status == 400, answer
    assert set(answer) == {"error"}
    assert fragment in answer["error"], answer["error"]


def test_compressed_bodies_are_refused(client: TestClient, bn_run: str) -> None:
    status, answer = post(
        client, bn_run, header_for() + ONE_IMAGE, len(header_for()), **{"Content-Encoding": "gzip"}
    )
    assert (status, answer) == (
        400,
        {"error": "compressed request bodies are not supported; send the body uncompressed"},
    )


def test_binary_bodies_have_the_json_body_limit(
    sqlite_backend: Backend, use_backend: Callable[[Backend], None]
) -> None:
    use_backend(Backend("sqlite", sqlite_backend.env | {"BNLAB_MAX_BODY_BYTES": "4096"}))
    with TestClient(create_app()) as client:
        run_id = store_trained_run(BN_SPEC)
        one = header_for()
        assert post(client, run_id, one + ONE_IMAGE, len(one))[0] == 200
        two = header_for().replace(b"[1, 784]", b"[2, 784]").replace(b"3136", b"6272")
        headers = {"Inference-Header-Content-Length": str(len(two))}
        too_large = client.post(f"/v2/models/{run_id}/infer", content=two + ONE_IMAGE * 2, headers=headers)
        assert too_large.status_code == 413, too_large.text
