"""User datasets: an uploaded .npz checked array by array, then stored re-encoded as safetensors.

An upload is a numpy .npz (a zip of .npy files) holding exactly two arrays:
- `x`: uint8 pixels (0..255, divided by 255 for the network, like the built-in images) or
  float32/float64 features (finite; stored as float32, used as they are), with 2 to 4 dims:
  [N, F], [N, H, W] (one channel, stored as [N, 1, H, W]) or [N, C, H, W];
- `y`: integer labels [N] in 0..K-1, 2 <= K <= 1000, every class with at least one sample.
The zip directory and each array's .npy header (dtype, shape) are checked before any array is read,
so an object array (a pickle) is refused without being unpickled (and `allow_pickle=False` anyway),
and a zip bomb is refused by its declared sizes. What is stored is the server's own safetensors
encoding of the checked arrays, never the uploaded bytes.
"""

from __future__ import annotations

import io
import math
import zipfile
from dataclasses import dataclass

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from service.ml.datasets import ImageDataset, InputKind
from service.ml.errors import DatasetError

MIN_SAMPLES = 10
MAX_SAMPLES = 1_000_000
MAX_FEATURES = 16_384  # per sample: CIFAR-10's 3×32×32 is 3,072, a 3×64×64 image 12,288
MAX_CLASSES = 1000
X_DTYPES = {np.dtype(np.uint8), np.dtype(np.float32), np.dtype(np.float64)}
ARRAYS = ("x.npy", "y.npy")
# Readers of the .npy header (they cap its length); format 3.0 only adds utf-8 field names.
_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


class UploadError(ValueError):
    """The upload is not a dataset we accept; the message says why, for the user."""


class UploadTooLarge(UploadError):
    """Over the byte limit (file or arrays)."""


@dataclass(frozen=True)
class CheckedArrays:
    x: np.ndarray  # uint8 or float32 [N, *sample_shape], C-contiguous
    y: np.ndarray  # int64 [N]
    num_classes: int

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    @property
    def input_kind(self) -> InputKind:
        return "pixels" if self.x.dtype == np.uint8 else "features"

    def dataset(self) -> ImageDataset:
        return ImageDataset(torch.from_numpy(self.x), torch.from_numpy(self.y), self.num_classes)


def check_npz(data: bytes, *, max_bytes: int) -> CheckedArrays:
    """Validate an uploaded .npz (see the module docstring); UploadError says what is wrong."""
    if len(data) > max_bytes:
        raise UploadTooLarge(f"the file is {len(data):,} bytes; the limit is {max_bytes:,}")
    members = _members(data, max_bytes=max_bytes)
    x_dtype, x_shape = _header(members, "x.npy")
    y_dtype, y_shape = _header(members, "y.npy")
    _check_x_header(x_dtype, x_shape)
    if y_dtype.kind not in "iu" or y_shape != (x_shape[0],):
        raise UploadError(
            f"y must be a 1-D integer array of {x_shape[0]} labels (one per sample of x); "
            f"got {y_dtype} of shape {list(y_shape)}"
        )
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        x, y = npz["x"], npz["y"]
    return CheckedArrays(_checked_x(x), *_checked_labels(y))


def _members(data: bytes, *, max_bytes: int) -> zipfile.ZipFile:
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as exc:
        raise UploadError("the file is not an .npz (a zip of .npy arrays, as numpy.savez writes)") from exc
    names = sorted(archive.namelist())
    if names != list(ARRAYS):
        found = [n.removesuffix(".npy") for n in names]
        raise UploadError(f"the .npz must hold exactly the arrays 'x' and 'y'; it holds {found}")
    unpacked = sum(info.file_size for info in archive.infolist())
    if unpacked > max_bytes:
        raise UploadTooLarge(f"the arrays unpack to {unpacked:,} bytes; the limit is {max_bytes:,}")
    return archive


def _header(archive: zipfile.ZipFile, name: str) -> tuple[np.dtype[np.generic], tuple[int, ...]]:
    """An array's dtype and shape from its .npy header, before reading any of its data."""
    try:
        with archive.open(name) as f:
            version = np.lib.format.read_magic(f)
            if version not in _HEADER_READERS:
                raise ValueError(f".npy format version {version} is not supported; use numpy.savez")
            shape, _fortran, dtype = _HEADER_READERS[version](f)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise UploadError(f"{name.removesuffix('.npy')} is not a readable .npy array ({exc})") from exc
    if dtype.hasobject:
        raise UploadError(
            f"{name.removesuffix('.npy')} holds Python objects, which numpy stores as a pickle; "
            "pickles are refused (unpickling can run code): send numeric arrays"
        )
    return dtype, tuple(shape)


def _check_x_header(dtype: np.dtype[np.generic], shape: tuple[int, ...]) -> None:
    if dtype not in X_DTYPES:
        raise UploadError(f"x must be uint8 (pixels 0..255) or float32/float64 (features); got {dtype}")
    if not 2 <= len(shape) <= 4:
        raise UploadError(f"x must be [N, F], [N, H, W] or [N, C, H, W]; got {len(shape)} dims {list(shape)}")
    if not MIN_SAMPLES <= shape[0] <= MAX_SAMPLES:
        raise UploadError(f"x has {shape[0]} samples; between {MIN_SAMPLES} and {MAX_SAMPLES:,} are accepted")
    features = math.prod(shape[1:])
    if not 1 <= features <= MAX_FEATURES or 0 in shape:
        raise UploadError(f"a sample of x has {features} values; 1 to {MAX_FEATURES:,} are accepted")


def _checked_x(x: np.ndarray) -> np.ndarray:
    if x.ndim == 3:
        x = x[:, None]  # grayscale images gain their channel: [N, 1, H, W]
    if x.dtype != np.uint8:
        with np.errstate(over="ignore"):  # float64 beyond float32's range becomes inf: refused below
            x = x.astype(np.float32)
        finite = np.isfinite(x.reshape(len(x), -1)).all(axis=1)
        if not finite.all():
            raise UploadError(
                f"x has NaN or infinite values (first in sample {int(np.argmin(finite))}); "
                "float features must be finite float32 numbers"
            )
    return np.ascontiguousarray(x)


def _checked_labels(y: np.ndarray) -> tuple[np.ndarray, int]:
    if y.min() < 0:
        raise UploadError(f"labels must be 0..K-1; y has {int(y.min())}")
    num_classes = int(y.max()) + 1
    if not 2 <= num_classes <= MAX_CLASSES:
        raise UploadError(f"labels must be 0..K-1 with 2 <= K <= {MAX_CLASSES}; y goes up to {int(y.max())}")
    counts = np.bincount(y.astype(np.int64), minlength=num_classes)
    if (counts == 0).any():
        missing = np.flatnonzero(counts == 0)[:10].tolist()
        raise UploadError(
            f"labels must be 0..K-1 with every class present (K = {num_classes}, from the largest "
            f"label); no sample has label {missing}"
        )
    return np.ascontiguousarray(y, dtype=np.int64), num_classes


def encode(arrays: CheckedArrays) -> bytes:
    """The stored form: safetensors with `x`, `y`, and the class count in its metadata."""
    return save_safetensors({"x": arrays.x, "y": arrays.y}, metadata={"num_classes": str(arrays.num_classes)})


def decode(data: bytes, num_classes: int) -> CheckedArrays:
    """A stored dataset back to arrays; DatasetError if the stored bytes are not what encode wrote."""
    try:
        tensors = load_safetensors(data)
    except (SafetensorError, ValueError) as exc:
        raise DatasetError(f"the stored dataset is corrupt ({exc})") from exc
    # Copies: safetensors hands back read-only arrays, which torch.from_numpy warns about.
    x, y = (np.array(a) if a is not None else None for a in (tensors.get("x"), tensors.get("y")))
    if x is None or y is None or y.dtype != np.int64 or x.dtype.name not in ("uint8", "float32"):
        raise DatasetError("the stored dataset is corrupt (arrays x and y missing or of the wrong type)")
    if y.shape != (x.shape[0],) or not len(y) or y.min() < 0 or y.max() >= num_classes:
        raise DatasetError("the stored dataset is corrupt (labels do not match its samples or classes)")
    return CheckedArrays(x, y, num_classes)
