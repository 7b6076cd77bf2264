"""Datasets end to end through real processes (API, Celery worker, SQLite and the folder broker, and
Postgres with Redis): an uploaded .npz and MNIST-1D train for real and their models serve, each with the
input scaling it was trained with; an RGB 32×32 upload serves an uploaded colour image."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.integration.stack import Stack, stack_on

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    folder = tmp_path_factory.mktemp(f"datasets-{request.param}")
    with stack_on(request.param, folder) as running:
        yield running


def npz(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)  # type: ignore[arg-type]
    return buffer.getvalue()


def upload(stack: Stack, data: bytes, name: str) -> dict[str, Any]:
    response = stack.client.post("/api/v1/datasets", files={"file": ("d.npz", data)}, data={"name": name})
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def train(stack: Stack, dataset: dict[str, Any], epochs: int = 2) -> dict[str, Any]:
    run_id = stack.submit(
        {"dataset": dataset, "model": {"hidden": [32]}, "train": {"epochs": epochs, "batch_size": 32}}
    )
    run = stack.wait_for(run_id, {"succeeded", "failed"})
    assert run["status"] == "succeeded", f"{run['error']}\n{stack.tail_logs()}"
    return run


def test_an_uploaded_float_dataset_trains_and_serves_raw_floats(stack: Stack) -> None:
    # Three classes told apart by the sign pattern of 6 features far outside [0, 1].
    rng = np.random.default_rng(0)
    y = np.arange(300) % 3
    centres = np.array([[-20.0, 5, 0, 0, 0, 0], [0, -5, 20, 0, 0, 0], [20, 0, -20, 0, 0, 0]])
    x = centres[y] + rng.normal(scale=2.0, size=(300, 6))
    dataset = upload(stack, npz(x=x, y=y), "three blobs")
    assert (dataset["sample_shape"], dataset["dtype"], dataset["num_classes"]) == ([6], "float32", 3)
    run = train(stack, {"name": "uploaded", "id": dataset["id"]})
    assert run["summary"]["val_accuracy"] > 0.9  # the blobs are far apart: it learned them
    answer = stack.client.post(f"/api/v1/runs/{run['id']}/predict", json={"inputs": centres.tolist()})
    assert answer.status_code == 200, answer.text
    assert answer.json()["predictions"] == [0, 1, 2]
    version = stack.client.get(f"/api/v1/runs/{run['id']}/versions/1/config.json").json()["model_config"]
    assert (version["input_shape"], version["input_kind"], version["num_classes"]) == ([6], "features", 3)
    # The dataset trains queued runs no more: it can go, and a new run naming it is refused.
    assert stack.client.delete(f"/api/v1/datasets/{dataset['id']}").status_code == 204
    gone = stack.client.post("/api/v1/runs", json={"dataset": {"name": "uploaded", "id": dataset["id"]}})
    assert gone.status_code == 422


def test_mnist1d_trains_and_serves_its_40_floats(stack: Stack) -> None:
    run = train(stack, {"name": "mnist1d"}, epochs=2)
    assert run["summary"]["val_accuracy"] > 0.15  # above chance (0.1) after two epochs of 3,200 samples
    sample = [[float(v) for v in np.linspace(-2.5, 2.5, 40)]]  # standardised values, outside [0, 1]
    answer = stack.client.post(f"/api/v1/runs/{run['id']}/predict", json={"inputs": sample})
    assert answer.status_code == 200, answer.text
    metadata = stack.client.get(f"/v2/models/{run['id']}").json()
    assert metadata["inputs"][0]["shape"] == [-1, 40]
    image = stack.client.post(f"/api/v1/runs/{run['id']}/predict", files={"file": ("a.png", png(8, 8, "L"))})
    assert image.status_code == 422
    assert "is not an image" in image.json()["detail"]


def png(width: int, height: int, mode: str) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height), "red" if mode == "RGB" else 0).save(buffer, format="PNG")
    return buffer.getvalue()


def test_an_rgb_upload_serves_uploaded_colour_images(stack: Stack) -> None:
    """CIFAR-shaped: uint8 [N, 3, 32, 32]; red images are class 0, blue ones class 1."""
    rng = np.random.default_rng(1)
    y = np.arange(60) % 2
    x = rng.integers(0, 60, (60, 3, 32, 32), dtype=np.uint8)
    x[y == 0, 0] += 180  # red channel up
    x[y == 1, 2] += 180  # blue channel up
    dataset = upload(stack, npz(x=x, y=y), "red or blue")
    assert (dataset["sample_shape"], dataset["dtype"]) == ([3, 32, 32], "uint8")
    run = train(stack, {"name": "uploaded", "id": dataset["id"]}, epochs=3)
    answer = stack.client.post(
        f"/api/v1/runs/{run['id']}/predict?invert=false", files={"file": ("red.png", png(64, 48, "RGB"))}
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["predictions"] == [0]
    assert answer.json()["image"]["width"] == 64
    outside = stack.client.post(
        f"/api/v1/runs/{run['id']}/predict", json={"inputs": [[[[2.0] * 32] * 32] * 3]}
    )
    assert outside.status_code == 422  # a pixel model still wants [0, 1]
    assert "[0, 1]" in outside.json()["detail"]
