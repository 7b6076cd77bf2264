"""Uploaded .npz datasets: what is accepted, how it is stored, and each refusal with its message."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
import torch

from service.ml.errors import DatasetError
from service.ml.uploads import UploadError, UploadTooLarge, check_npz, decode, encode

LIMIT = 1 << 20


def npz(compressed: bool = False, **arrays: object) -> bytes:
    buffer = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buffer, **arrays)  # type: ignore[operator]
    return buffer.getvalue()


def labels(n: int = 12, classes: int = 3) -> np.ndarray:
    return np.arange(n) % classes


def test_uint8_images_gain_their_channel_and_round_trip_through_storage() -> None:
    x = np.random.default_rng(0).integers(0, 256, (12, 5, 6), dtype=np.uint8)
    checked = check_npz(npz(x=x, y=labels().astype(np.uint8)), max_bytes=LIMIT)
    assert (checked.sample_shape, checked.num_classes, checked.input_kind) == ((1, 5, 6), 3, "pixels")
    assert checked.y.dtype == np.int64
    stored = decode(encode(checked), checked.num_classes)
    assert np.array_equal(stored.x[:, 0], x)
    ds = stored.dataset()
    assert (ds.sample_shape, ds.input_kind, len(ds), ds.x.dtype) == ((1, 5, 6), "pixels", 12, torch.uint8)


@pytest.mark.parametrize("compressed", [False, True])
def test_float64_features_become_float32(compressed: bool) -> None:
    x = np.linspace(-50, 50, 12 * 40).reshape(12, 40)
    checked = check_npz(npz(compressed, x=x, y=labels(classes=4)), max_bytes=LIMIT)
    assert (checked.x.dtype, checked.sample_shape, checked.input_kind) == (np.float32, (40,), "features")
    np.testing.assert_allclose(checked.x, x, rtol=1e-6)


def test_a_pickled_object_array_is_refused_without_unpickling() -> None:
    data = npz(x=np.array([object(), "a"] * 6, dtype=object), y=labels())
    with pytest.raises(UploadError, match=r"x holds Python objects, which numpy stores as a pickle; pickles"):
        check_npz(data, max_bytes=LIMIT)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x": np.zeros((12, 4), np.float32)}, r"exactly the arrays 'x' and 'y'; it holds \['x'\]"),
        (
            {"x": np.zeros((12, 4), np.float32), "y": labels(), "z": labels()},
            r"exactly the arrays 'x' and 'y'; it holds \['x', 'y', 'z'\]",
        ),
        (
            {"x": np.zeros((12, 4), np.int32), "y": labels()},
            "x must be uint8 .* or float32/float64 .*; got int32",
        ),
        ({"x": np.zeros(12, np.float32), "y": labels()}, r"x must be \[N, F\].*; got 1 dims"),
        ({"x": np.zeros((9, 4), np.float32), "y": labels(9)}, "x has 9 samples; between 10 and"),
        ({"x": np.zeros((12, 0), np.float32), "y": labels()}, "a sample of x has 0 values"),
        ({"x": np.zeros((12, 4), np.float32), "y": labels().astype(float)}, "y must be a 1-D integer array"),
        ({"x": np.zeros((12, 4), np.float32), "y": labels(11)}, "y must be a 1-D integer array of 12 labels"),
        ({"x": np.zeros((12, 4), np.float32), "y": labels() - 1}, "labels must be 0..K-1; y has -1"),
        ({"x": np.zeros((12, 4), np.float32), "y": np.zeros(12, int)}, r"2 <= K <= 1000; y goes up to 0"),
        (
            {"x": np.zeros((12, 4), np.float32), "y": labels() * 2},
            r"every class present .* no sample has label \[1, 3\]",
        ),
    ],
)
def test_refusals_say_what_is_wrong(arrays: dict[str, np.ndarray], message: str) -> None:
    with pytest.raises(UploadError, match=message):
        check_npz(npz(**arrays), max_bytes=LIMIT)


@pytest.mark.parametrize("bad", [np.nan, np.inf, 1e300])  # 1e300 is finite in float64, not in float32
def test_non_finite_features_are_refused(bad: float) -> None:
    x = np.zeros((12, 4))
    x[7, 2] = bad
    with pytest.raises(UploadError, match=r"NaN or infinite values \(first in sample 7\)"):
        check_npz(npz(x=x, y=labels()), max_bytes=LIMIT)


def test_not_an_npz() -> None:
    with pytest.raises(UploadError, match=r"not an \.npz"):
        check_npz(b"\x93NUMPY not a zip at all", max_bytes=LIMIT)


def test_size_limits_on_the_file_and_on_what_it_unpacks_to() -> None:
    x = np.zeros((1000, 300), np.float32)  # 1.2 MB of zeros, a few kB compressed
    with pytest.raises(UploadTooLarge, match="the file is .* bytes; the limit is 1,048,576"):
        check_npz(npz(x=x, y=np.arange(1000) % 2), max_bytes=LIMIT)
    small = npz(True, x=x, y=np.arange(1000) % 2)
    assert len(small) < LIMIT
    with pytest.raises(UploadTooLarge, match="the arrays unpack to 1,2.* bytes; the limit is 1,048,576"):
        check_npz(small, max_bytes=LIMIT)


def test_a_forged_npy_header_is_refused() -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("x.npy", b"\x93NUMPY\x01\x00" + b"\xff\xff" + b"{garbage")
        archive.writestr("y.npy", b"")
    with pytest.raises(UploadError, match="x is not a readable .npy array"):
        check_npz(buffer.getvalue(), max_bytes=LIMIT)


def test_decode_refuses_bytes_it_did_not_write() -> None:
    with pytest.raises(DatasetError, match="stored dataset is corrupt"):
        decode(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ", 3)
    checked = check_npz(npz(x=np.zeros((12, 2), np.float32), y=labels()), max_bytes=LIMIT)
    with pytest.raises(DatasetError, match="labels do not match"):
        decode(encode(checked), 2)  # label 2 does not fit 2 classes
