"""Datasets: MNIST-format IDX files, CIFAR-10's binary version, MNIST-1D and a synthetic set, all
generated or read here, plus the data shapes of the built-ins (known without loading anything).

A dataset is `x` (uint8 images, 0..255, divided by 255 for the network; or float32 features used as
they are) and int64 labels `y`. Files are read once per process (lru_caches keyed by the resolved
location and the split), so a worker that runs many jobs does not re-read and re-decompress them.
"""

from __future__ import annotations

import functools
import gzip
import math
import zlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from service.ml import cifar, mnist1d
from service.ml.config import InputKind
from service.ml.errors import DatasetError

Split = Literal["train", "test"]

IDX_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FILE_DATASETS = ("mnist", "fashion-mnist")
CIFAR10 = "cifar10"
MNIST1D = "mnist1d"
SYNTHETIC = "synthetic"
# Where Debian's dataset-fashion-mnist package puts the files.
SYSTEM_DATASET_DIR = Path("/usr/share/datasets")

IMAGE_SIZE = (28, 28)
NUM_CLASSES = 10
# What each built-in's class index means (the datasets' own documentation); synthetic data has none.
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
DIGITS = tuple(str(digit) for digit in range(10))
CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "fashion-mnist": FASHION_MNIST_CLASSES,
    "mnist": DIGITS,
    CIFAR10: CIFAR10_CLASSES,
    MNIST1D: DIGITS,
}
SYNTHETIC_TRAIN_SIZE = 10_000
SYNTHETIC_TEST_SIZE = 2_000

# IDX magic numbers: 0x00000803 (uint8, 3 dims) for images, 0x00000801 (uint8, 1 dim) for labels.
_IMAGES_MAGIC = 2051
_LABELS_MAGIC = 2049

__all__ = ["DatasetError", "InputKind"]  # re-exported: callers use datasets.DatasetError


@dataclass(frozen=True)
class DataShape:
    """What a model needs to know about its data, known before any sample is loaded."""

    input_shape: tuple[int, ...]  # one sample as the network sees it: (C, H, W) or (F,)
    num_classes: int
    input_kind: InputKind
    train_samples: int  # size of the training split (before val_split and limit)


# The built-ins' shapes, for the API to check a spec without reading a file.
BUILTIN_SHAPES: dict[str, DataShape] = {
    "fashion-mnist": DataShape((1, 28, 28), NUM_CLASSES, "pixels", 60_000),
    "mnist": DataShape((1, 28, 28), NUM_CLASSES, "pixels", 60_000),
    SYNTHETIC: DataShape((1, 28, 28), NUM_CLASSES, "pixels", SYNTHETIC_TRAIN_SIZE),
    CIFAR10: DataShape(cifar.SAMPLE_SHAPE, cifar.NUM_CLASSES, "pixels", cifar.TRAIN_SIZE),
    MNIST1D: DataShape((mnist1d.LENGTH,), mnist1d.NUM_CLASSES, "features", mnist1d.TRAIN_SIZE),
}


@dataclass(frozen=True, eq=False)  # eq=False: dataclass equality would compare tensors elementwise
class ImageDataset:
    """Samples of any shape: uint8 images [N, H, W] (one channel) or [N, C, H, W], or float32
    features [N, *sample_shape] such as MNIST-1D's [N, 40]; labels int64 [N] in 0..num_classes-1."""

    x: torch.Tensor
    y: torch.Tensor
    num_classes: int

    @property
    def sample_shape(self) -> tuple[int, ...]:
        if self.x.dtype == torch.uint8 and self.x.dim() == 3:
            return (1, self.x.shape[1], self.x.shape[2])  # grayscale images gain their channel
        return tuple(self.x.shape[1:])

    @property
    def input_kind(self) -> InputKind:
        return "pixels" if self.x.dtype == torch.uint8 else "features"

    def __len__(self) -> int:
        return self.x.shape[0]

    def take(self, indices: slice) -> ImageDataset:
        return ImageDataset(self.x[indices], self.y[indices], self.num_classes)


# ---------------------------------------------------------------------------------------- IDX files


def read_idx_images(path: Path) -> torch.Tensor:
    """Read an IDX image file (gzipped or not) into a uint8 tensor [N, rows, cols]."""
    dims, body = _read_idx(Path(path), _IMAGES_MAGIC, ndim=3)
    return torch.from_numpy(np.frombuffer(body, dtype=np.uint8).reshape(dims).copy())


def read_idx_labels(path: Path) -> torch.Tensor:
    """Read an IDX label file (gzipped or not) into an int64 tensor [N]."""
    dims, body = _read_idx(Path(path), _LABELS_MAGIC, ndim=1)
    return torch.from_numpy(np.frombuffer(body, dtype=np.uint8).astype(np.int64).reshape(dims))


def _read_idx(path: Path, magic: int, ndim: int) -> tuple[tuple[int, ...], memoryview]:
    """Check the header of an IDX file and return its dims and its data bytes."""
    data = _read_bytes(path)
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise DatasetError(f"{path}: not an IDX file of the expected kind (magic {found}, expected {magic})")
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise DatasetError(f"{path}: file too short ({len(data)} bytes) for its IDX header")
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header_len + math.prod(dims)
    if len(data) != expected:
        raise DatasetError(
            f"{path}: size {len(data)} bytes does not match its header (dims {dims} need {expected} bytes);"
            " the file is truncated or corrupt, download it again"
        )
    return dims, memoryview(data)[header_len:]  # a view: no second copy of 47 MB


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise DatasetError(f"{path}: cannot read the file ({e})") from e


def _find_file(directory: Path, gz_name: str) -> Path | None:
    """The gzipped file if present, else its uncompressed twin (as left by `gunzip`)."""
    for candidate in (directory / gz_name, directory / gz_name.removesuffix(".gz")):
        if candidate.is_file():
            return candidate
    return None


def find_dataset_dir(name: str, search_dirs: Sequence[Path]) -> Path | None:
    """The first `d / name` among `search_dirs` that holds the dataset's training files."""
    for parent in search_dirs:
        directory = Path(parent) / name
        if name == CIFAR10:
            if cifar.find_source(directory) is not None:
                return directory
        elif all(_find_file(directory, f) is not None for f in IDX_FILES["train"]):
            return directory
    return None


def needs_files(name: str) -> bool:
    return name in FILE_DATASETS or name == CIFAR10


def missing_dataset_message(name: str, search_dirs: Sequence[Path]) -> str:
    searched = ", ".join(str(Path(d) / name) for d in search_dirs) or "(no directories configured)"
    if name == CIFAR10:
        refusals = [r for d in search_dirs if (r := cifar.pickled_version_refusal(Path(d) / name))]
        return " ".join(
            [
                f"Dataset 'cifar10' not found. {cifar.WHAT_IS_NEEDED} Searched: {searched}. Or set"
                " BNLAB_ALLOW_DOWNLOAD=1 to let the worker download it.",
                *refusals,
            ]
        )
    files = ", ".join(f for pair in IDX_FILES.values() for f in pair)
    return (
        f"Dataset {name!r} not found. It needs the IDX files {files} (gzipped or not; the t10k test files"
        f" only for the test split) in a directory named {name!r} under one of the search directories."
        f" Searched: {searched}. On Debian, `apt-get install dataset-fashion-mnist` provides Fashion-MNIST"
        f" in {SYSTEM_DATASET_DIR / 'fashion-mnist'}; for MNIST, put the files in one of the directories"
        " above, or set BNLAB_ALLOW_DOWNLOAD=1 to let the worker download them."
    )


# ---------------------------------------------------------------------------------------- loading


def load_dataset(
    name: str, *, search_dirs: Sequence[Path], split: Split = "train", limit: int | None = None
) -> ImageDataset:
    """Load a split of a named built-in dataset; `limit` keeps the first `limit` samples.

    For "synthetic", `limit` is the number of samples to generate instead (10k train, 2k test when
    None). The returned tensors are shared with the process cache: treat them as read-only.
    """
    if split not in IDX_FILES:
        raise DatasetError(f"unknown split {split!r}; expected 'train' or 'test'")
    if limit is not None and limit < 1:
        raise DatasetError(f"limit must be a positive number of samples, got {limit}")
    if name == SYNTHETIC:
        default = SYNTHETIC_TRAIN_SIZE if split == "train" else SYNTHETIC_TEST_SIZE
        # A different sample seed per split, the same class prototypes: the test set is the same task.
        return make_synthetic(limit or default, seed=0 if split == "train" else 1)
    if name not in BUILTIN_SHAPES:
        raise DatasetError(f"unknown dataset {name!r}; known datasets: {', '.join(BUILTIN_SHAPES)}")
    if name == MNIST1D:
        ds = _load_mnist1d(split)
    else:
        directory = find_dataset_dir(name, search_dirs)
        if directory is None:
            raise DatasetError(missing_dataset_message(name, search_dirs))
        loader = _load_cifar if name == CIFAR10 else _load_files
        ds = loader(str(directory.resolve()), split)
    return ds if limit is None else ds.take(slice(0, limit))


@functools.lru_cache(maxsize=4)
def _load_cifar(directory: str, split: Split) -> ImageDataset:
    x, y = cifar.read_split(Path(directory), split)
    return ImageDataset(torch.from_numpy(x), torch.from_numpy(y), cifar.NUM_CLASSES)


@functools.lru_cache(maxsize=2)
def _load_mnist1d(split: Split) -> ImageDataset:
    data = mnist1d.make_dataset()
    x, y = (data.x, data.y) if split == "train" else (data.x_test, data.y_test)
    return ImageDataset(torch.from_numpy(x), torch.from_numpy(y), mnist1d.NUM_CLASSES)


@functools.lru_cache(maxsize=8)
def _load_files(directory: str, split: Split) -> ImageDataset:
    images_name, labels_name = IDX_FILES[split]
    images_path = _find_file(Path(directory), images_name)
    labels_path = _find_file(Path(directory), labels_name)
    if images_path is None or labels_path is None:
        raise DatasetError(f"{directory}: the {split} split needs {images_name} and {labels_name}")
    x = read_idx_images(images_path)
    y = read_idx_labels(labels_path)
    if tuple(x.shape[1:]) != IMAGE_SIZE:
        raise DatasetError(f"{images_path}: images are {tuple(x.shape[1:])}, expected {IMAGE_SIZE}")
    if x.shape[0] != y.shape[0]:
        raise DatasetError(f"{images_path} has {x.shape[0]} images but {labels_path} has {y.shape[0]} labels")
    if y.numel() and int(y.max()) >= NUM_CLASSES:
        raise DatasetError(f"{labels_path}: label {int(y.max())} is outside 0..{NUM_CLASSES - 1}")
    return ImageDataset(x, y, NUM_CLASSES)


# ---------------------------------------------------------------------------------------- synthetic

# Tuned by hand (batch 32, Adam 1e-3, the article's 128-unit MLP, 1600 train / 400 val samples, seeds 0
# and 1): after 2 epochs val accuracy is ~0.73-0.76 without BN and ~0.94-0.95 with BN; not 1.0.
_SYN_MAX_SHIFT = 3  # pixels
_SYN_NOISE = 60.0  # std of the pixel noise, in 0..255 units
_SYN_SHARED = 0.4  # weight of the pattern all classes share; the rest is class-specific


def make_synthetic(n: int, seed: int = 0, *, prototype_seed: int = 0) -> ImageDataset:
    """A generated 10-class 28x28 uint8 dataset: learnable, but not in one step.

    Each class has a smooth random prototype (drawn from `prototype_seed`, shared by every `seed` so
    that train and test splits pose the same task); a sample is its class prototype shifted by up to
    +-3 pixels, scaled in contrast, plus pixel noise, all drawn from `seed`.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    prototypes = _prototypes(prototype_seed)
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    images = _shifted(prototypes[y], max_shift=_SYN_MAX_SHIFT, generator=g)
    contrast = torch.empty(n, 1, 1).uniform_(0.6, 1.4, generator=g)
    noise = torch.randn(n, *IMAGE_SIZE, generator=g) * _SYN_NOISE
    x = (images * contrast + noise).clamp(0, 255).round().to(torch.uint8)
    return ImageDataset(x, y, NUM_CLASSES)


def _prototypes(seed: int) -> torch.Tensor:
    """10 smooth [28, 28] patterns in 0..255: upsampled 7x7 noise, part shared, part per class."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(NUM_CLASSES + 1, 1, 7, 7, generator=g)
    smooth = F.interpolate(coarse, size=IMAGE_SIZE, mode="bicubic", align_corners=False)[:, 0]
    mixed = _SYN_SHARED * smooth[-1:] + (1 - _SYN_SHARED) * smooth[:-1]
    lo = mixed.amin(dim=(1, 2), keepdim=True)
    hi = mixed.amax(dim=(1, 2), keepdim=True)
    return (mixed - lo) / (hi - lo) * 255.0


def _shifted(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by its own random offset (zero fill), by gathering from a padded copy."""
    n, h, w = images.shape
    padded = F.pad(images, (max_shift, max_shift, max_shift, max_shift))
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, n, 1), generator=generator)
    rows = (torch.arange(h) + dy)[:, :, None]  # [n, h, 1]
    cols = (torch.arange(w) + dx)[:, None, :]  # [n, 1, w]
    return padded[torch.arange(n)[:, None, None], rows, cols]


# ---------------------------------------------------------------------------------------- helpers


def split_sizes(n: int, val_split: float) -> tuple[int, int]:
    """(training, validation) sample counts of `train_val_split` on `n` samples: the one place the
    split's rounding is written (budgets and estimates use it too)."""
    if not 0.0 < val_split < 1.0:
        raise ValueError(f"val_split must be in (0, 1), got {val_split}")
    n_train = int(n * (1.0 - val_split))
    return n_train, n - n_train


def train_val_split(ds: ImageDataset, val_split: float) -> tuple[ImageDataset, ImageDataset]:
    """Hold out the LAST `val_split` fraction, unshuffled, as Keras' `validation_split` does."""
    split_at, _ = split_sizes(len(ds), val_split)
    return ds.take(slice(0, split_at)), ds.take(slice(split_at, None))


def to_inputs(x: torch.Tensor) -> torch.Tensor:
    """Samples as the network takes them: uint8 pixels -> float32 / 255 (the article divides by 255),
    grayscale [N, H, W] gaining its channel [N, 1, H, W]; float features are used as they are."""
    if x.dtype != torch.uint8:
        return x.to(torch.float32)
    scaled = x.to(torch.float32).div_(255.0)
    return scaled.unsqueeze(1) if scaled.dim() == 3 else scaled


# The float inputs of the last splits converted in this process, by the tensor they came from: a
# grid's runs train on the same split, and converting it again took 80 ms a run for 48,000
# Fashion-MNIST images (a tenth of a one-second run). Each entry keeps its source tensor alive, so
# that no other data can come to sit at the same address under the same key; training and
# evaluation only read them. At most this much memory stays held between runs:
CONVERTED_CACHE_BYTES = 256 * 1024 * 1024
_converted: OrderedDict[tuple[object, ...], tuple[torch.Tensor, torch.Tensor]] = OrderedDict()


def to_inputs_once(x: torch.Tensor) -> torch.Tensor:
    """`to_inputs(x)`, reused while this process converts the same CPU tensor again: never modify
    the result in place."""
    if x.device.type != "cpu":
        return to_inputs(x)
    key = (x.untyped_storage().data_ptr(), x.storage_offset(), tuple(x.shape), x.stride(), x.dtype)
    hit = _converted.get(key)
    if hit is not None:
        _converted.move_to_end(key)
        return hit[1]
    converted = to_inputs(x)
    _converted[key] = (x, converted)
    while _converted and _converted_bytes() > CONVERTED_CACHE_BYTES:
        _converted.popitem(last=False)  # the least recently used; the new entry too if it alone is larger
    return converted


def _converted_bytes() -> int:
    return sum(t.numel() * t.element_size() for _, t in _converted.values())
