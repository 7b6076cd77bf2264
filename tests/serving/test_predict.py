"""POST /api/v1/runs/{id}/predict: JSON or an uploaded image on the same route, fused or not, and
mode=train (batch statistics, stored buffers untouched)."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from service.ml import datasets
from service.serving import images
from tests.serving.conftest import oracle_probabilities, stored_model

# Three Fashion-MNIST test images (Debian's dataset-fashion-mnist; .ci/run installs it): light-on-dark.
FASHION = datasets.load_dataset(
    "fashion-mnist", search_dirs=[datasets.SYSTEM_DATASET_DIR], split="test", limit=3
)
SAMPLES = FASHION.x.numpy()  # uint8 [3, 28, 28]


def png(array: np.ndarray, mode: str = "L") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


def upload(client: TestClient, run_id: str, data: bytes, name: str = "digit.png", **params: str) -> dict:  # type: ignore[type-arg]
    response = client.post(f"/api/v1/runs/{run_id}/predict", params=params, files={"file": (name, data)})
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def test_json_predict_is_fused_by_default_and_agrees_with_unfused(client: TestClient, bn_run: str) -> None:
    pixels = SAMPLES / 255.0
    fused = client.post(f"/api/v1/runs/{bn_run}/predict", json={"inputs": pixels.tolist()}).json()
    unfused = client.post(
        f"/api/v1/runs/{bn_run}/predict?fused=false", json={"inputs": pixels.tolist()}
    ).json()
    assert (fused["fused"], unfused["fused"], fused["mode"], fused["model_version"]) == (
        True,
        False,
        "eval",
        1,
    )
    expected = oracle_probabilities(bn_run, pixels)
    np.testing.assert_allclose(unfused["probabilities"], expected, atol=1e-6)
    np.testing.assert_allclose(fused["probabilities"], expected, atol=1e-5)
    assert fused["predictions"] == expected.argmax(1).tolist()


def test_an_uploaded_png_predicts_exactly_like_its_pixels(client: TestClient, bn_run: str) -> None:
    answer = upload(client, bn_run, png(SAMPLES[0]))
    assert answer["image"] == {"format": "PNG", "width": 28, "height": 28, "inverted": False}
    np.testing.assert_allclose(
        answer["probabilities"], oracle_probabilities(bn_run, SAMPLES[:1] / 255.0), atol=1e-5
    )


def test_dark_on_light_images_are_inverted_unless_told_not_to(client: TestClient, bn_run: str) -> None:
    light_background = png(255 - SAMPLES[1])
    auto = upload(client, bn_run, light_background)
    assert auto["image"]["inverted"] is True
    np.testing.assert_allclose(
        auto["probabilities"], oracle_probabilities(bn_run, SAMPLES[1:2] / 255.0), atol=1e-5
    )
    kept = upload(client, bn_run, light_background, invert="false")
    assert kept["image"]["inverted"] is False
    np.testing.assert_allclose(
        kept["probabilities"], oracle_probabilities(bn_run, (255 - SAMPLES[1:2]) / 255.0), atol=1e-5
    )


def test_jpeg_photo_in_rgb_is_accepted(client: TestClient, bn_run: str) -> None:
    photo = np.full((120, 240, 3), 250, dtype=np.uint8)  # white paper, dark ink: a wide photo
    photo[40:80, 60:180] = (20, 30, 40)
    buffer = io.BytesIO()
    Image.fromarray(photo, mode="RGB").save(buffer, format="JPEG", quality=90)
    answer = upload(client, bn_run, buffer.getvalue(), name="photo.jpg")
    assert answer["image"] == {"format": "JPEG", "width": 240, "height": 120, "inverted": True}
    assert len(answer["probabilities"][0]) == 10


def test_conversion_rule_letterboxes_and_flattens_transparency() -> None:
    wide = np.full((28, 56), 255, dtype=np.uint8)  # a white image twice as wide as high
    tensor, info = images.decode_image(png(wide), (1, 28, 28), invert="false")
    assert tuple(tensor.shape) == (1, 1, 28, 28)
    rows = tensor[0, 0].mean(dim=1)
    # 56×28 → 28×14: rows 7..20 hold the image, the 7 rows above and below are black padding.
    assert torch.all(rows[:7] == 0)
    assert torch.all(rows[21:] == 0)
    assert torch.all(rows[8:20] > 0.5)
    assert not info.inverted
    rgba = np.zeros((28, 28, 4), dtype=np.uint8)  # transparent everywhere...
    rgba[10:18, 10:18] = (0, 0, 0, 255)  # ...but an opaque black square
    tensor, info = images.decode_image(png(rgba, mode="RGBA"), (1, 28, 28))
    assert info.inverted  # transparency counts as white paper
    assert tensor[0, 0, 0, 0] == 0.0
    assert tensor[0, 0, 14, 14] == 1.0


def test_exif_orientation_is_applied() -> None:
    tall = Image.new("L", (20, 40), 0)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display": a phone held upright
    buffer = io.BytesIO()
    tall.save(buffer, format="JPEG", exif=exif.tobytes())
    _, info = images.decode_image(buffer.getvalue(), (1, 28, 28))
    assert (info.width, info.height) == (40, 20)


def fake_png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width×height, followed by a tiny compressed body: a decompression bomb."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 1000))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    ("data", "status", "fragment"),
    [
        (b"hello, I am text", 422, "not a PNG or JPEG"),
        (b"GIF89a" + b"\0" * 64, 422, "not a PNG or JPEG"),
        (png(SAMPLES[0])[:60], 422, "cannot be"),  # truncated
        (fake_png_header(20_000, 20_000), 413, "pixels"),
        (fake_png_header(100_000, 100_000), 413, "pixels"),
        (b"\x89PNG" + b"\0" * (images.MAX_IMAGE_BYTES + 1), 413, "bytes"),
    ],
    ids=["text", "gif", "truncated", "bomb-400Mpx", "bomb-10Gpx", "too-many-bytes"],
)
def test_bad_uploads_are_4xx(
    client: TestClient, bn_run: str, data: bytes, status: int, fragment: str
) -> None:
    response = client.post(f"/api/v1/runs/{bn_run}/predict", files={"file": ("x.png", data)})
    assert response.status_code == status, response.text
    assert fragment in response.json()["detail"]


def test_wrong_field_wrong_content_type_and_train_mode_on_one_image(client: TestClient, bn_run: str) -> None:
    response = client.post(f"/api/v1/runs/{bn_run}/predict", files={"image": ("x.png", png(SAMPLES[0]))})
    assert response.status_code == 422
    assert "field named 'file'" in response.json()["detail"]
    text = client.post(
        f"/api/v1/runs/{bn_run}/predict", content=b"0.5", headers={"content-type": "text/plain"}
    )
    assert text.status_code == 415
    one = client.post(f"/api/v1/runs/{bn_run}/predict?mode=train", files={"file": ("x.png", png(SAMPLES[0]))})
    assert one.status_code == 422
    assert "at least 2 samples" in one.json()["detail"]


def test_json_body_errors_stay_422_with_locations(client: TestClient, bn_run: str) -> None:
    response = client.post(f"/api/v1/runs/{bn_run}/predict", json={"inputs": [], "extra": 1})
    assert response.status_code == 422
    locations = [tuple(error["loc"]) for error in response.json()["errors"]]
    assert ("body", "inputs") in locations
    assert ("body", "extra") in locations
    bad = client.post(f"/api/v1/runs/{bn_run}/predict", json={"inputs": [[0.5] * 3]})
    assert bad.status_code == 422
    assert "N×784" in bad.json()["detail"]
    nan = client.post(
        f"/api/v1/runs/{bn_run}/predict",
        content=b'{"inputs": [[NaN]]}',
        headers={"content-type": "application/json"},
    )
    assert nan.status_code == 422
    boolean = client.post(f"/api/v1/runs/{bn_run}/predict", json={"inputs": [[0.5] * 783 + [True]]})
    assert boolean.status_code == 422
    assert "true/false are not numbers" in boolean.json()["detail"]
    assert client.post(f"/api/v1/runs/{'0' * 32}/predict", json={"inputs": [[0.5] * 784]}).status_code == 404
    assert (
        client.post(f"/api/v1/runs/{bn_run}/predict?version=2", json={"inputs": [[0.5] * 784]}).status_code
        == 404
    )


def test_train_mode_uses_batch_statistics_and_leaves_the_buffers_alone(
    client: TestClient, bn_run: str
) -> None:
    pixels = SAMPLES / 255.0
    stats_before = client.get(f"/api/v1/runs/{bn_run}/bn-stats").json()
    eval_before = client.post(f"/api/v1/runs/{bn_run}/predict", json={"inputs": pixels.tolist()}).json()
    train = client.post(f"/api/v1/runs/{bn_run}/predict?mode=train", json={"inputs": pixels.tolist()}).json()
    assert (train["mode"], train["fused"]) == ("train", False)
    # The article's block, Linear -> ReLU -> BN -> Linear, written out with this batch's statistics.
    model = stored_model(bn_run)
    fc1, bn1, out = (model.get_submodule(name) for name in ("fc1", "bn1", "out"))
    with torch.no_grad():
        h = torch.relu(fc1(torch.as_tensor(pixels, dtype=torch.float32).reshape(3, -1)))
        normalised = (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + bn1.eps) * bn1.weight + bn1.bias
        expected = out(normalised).softmax(1).numpy()
    np.testing.assert_allclose(train["probabilities"], expected, atol=1e-5)
    assert not np.allclose(train["probabilities"], eval_before["probabilities"], atol=1e-3)
    # Nothing moved: the statistics and the eval-mode answers are what they were.
    assert client.get(f"/api/v1/runs/{bn_run}/bn-stats").json() == stats_before
    eval_after = client.post(f"/api/v1/runs/{bn_run}/predict", json={"inputs": pixels.tolist()}).json()
    assert eval_after["probabilities"] == eval_before["probabilities"]
