"""/api/v1/datasets in-process, on a migrated SQLite database and the embedded folder broker: uploads,
their refusals (each with its message, nothing stored), listing, deletion, and run specs naming them."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.main import create_app
from tests.conftest import Backend

MAX_BYTES = 256 * 1024


@pytest.fixture
def client(
    sqlite_backend: Backend, use_backend: Callable[[Backend], None], monkeypatch: pytest.MonkeyPatch
) -> Iterator[TestClient]:
    sqlite_backend.env["BNLAB_MAX_DATASET_BYTES"] = str(MAX_BYTES)
    sqlite_backend.env["BNLAB_MAX_BODY_BYTES"] = str(64 * 1024)  # below the upload limit on purpose
    use_backend(sqlite_backend)
    with TestClient(create_app()) as test_client:
        yield test_client


def npz_bytes(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    return buffer.getvalue()


def features(n: int = 40, width: int = 6, classes: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"x": rng.normal(size=(n, width)).astype(np.float32), "y": np.arange(n) % classes}


def upload(client: TestClient, data: bytes, name: str = "tiny") -> tuple[int, dict[str, object]]:
    response = client.post("/api/v1/datasets", files={"file": ("data.npz", data)}, data={"name": name})
    return response.status_code, response.json()


def test_upload_list_get_and_delete(client: TestClient) -> None:
    images = np.random.default_rng(1).integers(0, 256, (30, 8, 8), dtype=np.uint8)
    response = client.post(
        "/api/v1/datasets",
        files={"file": ("d.npz", npz_bytes(x=images, y=np.arange(30) % 5))},
        data={"name": "tiny images"},
    )
    assert response.status_code == 201, response.text
    body = response.json()
    assert response.headers["location"] == f"/api/v1/datasets/{body['id']}"
    assert {k: body[k] for k in ("name", "sample_shape", "num_classes", "num_samples", "dtype")} == {
        "name": "tiny images",
        "sample_shape": [1, 8, 8],
        "num_classes": 5,
        "num_samples": 30,
        "dtype": "uint8",
    }
    assert len(body["sha256"]) == 64
    listed = client.get("/api/v1/datasets").json()
    assert (listed["total"], [d["id"] for d in listed["items"]]) == (1, [body["id"]])
    assert client.get(f"/api/v1/datasets/{body['id']}").json() == body
    assert client.delete(f"/api/v1/datasets/{body['id']}").status_code == 204
    assert client.get(f"/api/v1/datasets/{body['id']}").status_code == 404
    assert client.get("/api/v1/datasets").json()["total"] == 0


def test_an_upload_larger_than_the_general_body_limit_is_accepted(client: TestClient) -> None:
    """The datasets route has its own limit (BNLAB_MAX_DATASET_BYTES), above BNLAB_MAX_BODY_BYTES."""
    status, body = upload(client, npz_bytes(**features(n=3000, width=10)))  # ~120 kB > 64 kB
    assert status == 201, body
    assert body["num_samples"] == 3000


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        (
            {"x": np.array([{"a": 1}] * 12, dtype=object), "y": np.arange(12) % 2},
            "a pickle; pickles are refused",
        ),
        ({"data": np.zeros((12, 3), np.float32), "y": np.arange(12) % 2}, "exactly the arrays 'x' and 'y'"),
        ({"x": np.full((12, 3), np.nan, np.float32), "y": np.arange(12) % 2}, "NaN or infinite values"),
        ({"x": np.zeros((12, 3), np.float32), "y": np.arange(12) % 2 + 1}, "every class present"),
        ({"x": np.zeros((12, 3), np.float32), "y": np.arange(12) - 1}, "labels must be 0..K-1; y has -1"),
        ({"x": np.zeros((12, 3), np.float32), "y": np.arange(12) % 1001 + 990}, "2 <= K <= 1000"),
    ],
)
def test_refused_uploads_say_why_and_store_nothing(
    client: TestClient, arrays: dict[str, np.ndarray], message: str
) -> None:
    status, body = upload(client, npz_bytes(**arrays))
    assert status == 422
    assert message in str(body["detail"])
    assert client.get("/api/v1/datasets").json()["total"] == 0


def test_wrong_content_and_wrong_forms(client: TestClient) -> None:
    status, body = upload(client, b"PK\x03\x04 this is no zip")
    assert (status, body["detail"]) == (
        422,
        "the file is not an .npz (a zip of .npy arrays, as numpy.savez writes)",
    )
    response = client.post("/api/v1/datasets", json={"x": [1, 2], "y": [0, 1]})
    assert response.status_code == 415
    assert "multipart/form-data" in response.json()["detail"]
    data = npz_bytes(**features())
    no_name = client.post("/api/v1/datasets", files={"file": ("d.npz", data)})
    assert (no_name.status_code, "'name' field" in no_name.json()["detail"]) == (422, True)
    path_name = client.post("/api/v1/datasets", files={"file": ("d.npz", data)}, data={"name": "../etc"})
    assert path_name.status_code == 422
    extra = client.post(
        "/api/v1/datasets", files={"file": ("d.npz", data)}, data={"name": "a", "url": "http://127.0.0.1/"}
    )
    assert (extra.status_code, extra.json()["detail"]) == (
        422,
        "unexpected form fields ['url']: send only 'file' and 'name'",
    )
    assert client.get("/api/v1/datasets").json()["total"] == 0


def test_too_big_is_413(client: TestClient) -> None:
    status, body = upload(client, b"\0" * (MAX_BYTES + 1))  # just over: the route answers, in JSON
    assert (status, body["detail"]) == (
        413,
        "datasets are limited to 262,144 bytes (BNLAB_MAX_DATASET_BYTES)",
    )
    # Far over: refused by the declared length before the body is read, as on every route.
    far = client.post(
        "/api/v1/datasets", files={"file": ("d.npz", b"\0" * (4 * MAX_BYTES))}, data={"name": "a"}
    )
    assert far.status_code == 413
    assert client.get("/api/v1/datasets").json()["total"] == 0


def test_runs_name_an_upload_by_id(client: TestClient) -> None:
    status, body = upload(client, npz_bytes(**features()))
    assert status == 201
    spec = {"dataset": {"name": "uploaded", "id": body["id"]}, "train": {"epochs": 1}}
    response = client.post("/api/v1/runs", json=spec)
    assert response.status_code == 202, response.text
    assert response.json()["spec"]["dataset"]["id"] == body["id"]
    run_id = response.json()["id"]
    # Queued runs train on it: it cannot be deleted until they end.
    conflict = client.delete(f"/api/v1/datasets/{body['id']}")
    assert conflict.status_code == 409
    assert run_id in conflict.json()["detail"]
    assert client.post(f"/api/v1/runs/{run_id}/cancel").status_code == 200
    assert client.delete(f"/api/v1/datasets/{body['id']}").status_code == 204
    gone = client.post("/api/v1/runs", json=spec)
    assert gone.status_code == 422
    assert gone.json()["detail"] == f"uploaded dataset {body['id']} not found (never uploaded, or deleted)"


@pytest.mark.parametrize(
    ("dataset", "message"),
    [
        ({"name": "uploaded"}, "dataset.id is required with name 'uploaded'"),
        ({"name": "mnist1d", "id": "0" * 32}, "dataset.id is only for name 'uploaded'"),
        ({"name": "uploaded", "id": "../../etc/passwd"}, "String should match pattern"),
    ],
)
def test_dataset_ids_in_specs_are_checked(client: TestClient, dataset: dict[str, str], message: str) -> None:
    response = client.post("/api/v1/runs", json={"dataset": dataset})
    assert response.status_code == 422
    assert message in str(response.json()["detail"])


def test_parameter_budget_counts_the_real_input_size(client: TestClient) -> None:
    """784 inputs would fit: 16,384 features per sample do not."""
    wide = {"x": np.zeros((12, 16_384), np.uint8), "y": np.arange(12) % 3}  # 196 kB of pixels
    status, body = upload(client, npz_bytes(**wide))
    assert status == 201, body
    spec = {"dataset": {"name": "uploaded", "id": body["id"]}, "model": {"hidden": [2048, 2048]}}
    response = client.post("/api/v1/runs", json=spec)
    assert response.status_code == 422
    assert (
        "parameters on uploaded (16,384 inputs, 3 classes); the limit is 20,000,000"
        in response.json()["detail"]
    )
    small = client.post("/api/v1/runs", json=spec | {"dataset": {"name": "mnist1d"}})
    assert small.status_code == 202, small.text
