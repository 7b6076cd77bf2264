"""CIFAR-10 from its binary version: `cifar-10-batches-bin/data_batch_{1..5}.bin` and `test_batch.bin`.

Each record is 1 label byte and 3072 pixel bytes: the R, G and B planes of a 32×32 image, row by
row. The files are read either extracted (in the dataset directory or its `cifar-10-batches-bin/`)
or straight from the `cifar-10-binary.tar.gz` archive, member by member in memory: nothing is
extracted to disk, and links, absolute names and `..` are never followed. The "python version"
(`cifar-10-python.tar.gz`, `cifar-10-batches-py/`) stores its batches as pickles, and unpickling
runs code: it is refused.
"""

from __future__ import annotations

import tarfile
from pathlib import Path, PurePosixPath
from typing import Literal

import numpy as np

from service.ml.errors import DatasetError

NUM_CLASSES = 10
SAMPLE_SHAPE = (3, 32, 32)
RECORD_BYTES = 1 + 3 * 32 * 32  # 3073
TRAIN_SIZE = 50_000
BATCH_RECORDS = 10_000
ARCHIVE = "cifar-10-binary.tar.gz"
MEMBER_DIR = "cifar-10-batches-bin"
SPLIT_FILES: dict[str, tuple[str, ...]] = {
    "train": tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
    "test": ("test_batch.bin",),
}
PICKLED_VERSION = ("cifar-10-python.tar.gz", "cifar-10-batches-py")
WHAT_IS_NEEDED = (
    f"It needs CIFAR-10's binary version: {ARCHIVE} (as downloaded), or its files data_batch_1.bin .."
    f" data_batch_5.bin and test_batch.bin, in a directory named 'cifar10' (or in its {MEMBER_DIR}/)"
    " under one of the search directories."
)
# A batch file is 30,730,000 bytes; anything much larger in the archive is not one of ours.
MAX_MEMBER_BYTES = 2 * BATCH_RECORDS * RECORD_BYTES

Source = tuple[Literal["dir", "archive"], Path]


def find_source(directory: Path) -> Source | None:
    """Where the binary version is in `directory`: a folder of .bin files, or the archive."""
    for folder in (directory, directory / MEMBER_DIR):
        if all((folder / name).is_file() for name in SPLIT_FILES["train"]):
            return "dir", folder
    if (directory / ARCHIVE).is_file():
        return "archive", directory / ARCHIVE
    return None


def read_split(directory: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images [N, 3, 32, 32] and int64 labels [N] of one split."""
    source = find_source(directory)
    if source is None:
        raise DatasetError(pickled_version_refusal(directory) or f"{directory}: not found. {WHAT_IS_NEEDED}")
    names = SPLIT_FILES[split]
    kind, path = source
    if kind == "archive":
        blobs = _read_members(path, names)
    else:
        missing = [name for name in names if not (path / name).is_file()]
        if missing:
            raise DatasetError(f"{path}: the {split} split needs {', '.join(missing)}")
        blobs = {name: (path / name).read_bytes() for name in names}
    parts = [parse_batch(blobs[n], f"{path}:{n}" if kind == "archive" else str(path / n)) for n in names]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def parse_batch(data: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Records -> (images [n, 3, 32, 32] uint8, labels [n] int64), sizes and labels checked."""
    if not data or len(data) % RECORD_BYTES:
        raise DatasetError(
            f"{where}: {len(data)} bytes is not a whole number of {RECORD_BYTES}-byte records "
            "(1 label byte + 3072 pixels); the file is truncated or not CIFAR-10's binary version"
        )
    records = np.frombuffer(data, dtype=np.uint8).reshape(-1, RECORD_BYTES)
    labels = records[:, 0].astype(np.int64)
    if labels.max() >= NUM_CLASSES:
        bad = int(np.argmax(labels >= NUM_CLASSES))
        raise DatasetError(f"{where}: record {bad} has label {labels[bad]}, outside 0..{NUM_CLASSES - 1}")
    images = records[:, 1:].reshape(-1, *SAMPLE_SHAPE).copy()  # a copy: the bytes object is freed
    return images, labels


def _read_members(archive: Path, names: tuple[str, ...]) -> dict[str, bytes]:
    """The wanted regular-file members of the archive, read in memory."""
    wanted = {f"{MEMBER_DIR}/{name}": name for name in names}
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                name = PurePosixPath(member.name)
                # Only plain files with the expected relative names: a link, a device, an absolute
                # name or a '..' is skipped, never followed (and nothing is written anywhere).
                if not member.isreg() or name.is_absolute() or ".." in name.parts:
                    continue
                key = wanted.get(str(name))
                if key is None:
                    continue
                if member.size > MAX_MEMBER_BYTES:
                    raise DatasetError(
                        f"{archive}:{member.name} is {member.size} bytes; too large for a batch"
                    )
                stream = tar.extractfile(member)
                if stream is None:
                    continue
                found[key] = stream.read()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DatasetError(f"{archive}: cannot read the archive ({exc}); download it again") from exc
    missing = [name for name in names if name not in found]
    if missing:
        raise DatasetError(f"{archive}: the archive has no {', '.join(f'{MEMBER_DIR}/{m}' for m in missing)}")
    return found


def pickled_version_refusal(directory: Path) -> str | None:
    """Why the python version, if that is what `directory` holds, is refused; None otherwise."""
    for name in PICKLED_VERSION:
        if (directory / name).exists():
            return (
                f"{directory / name} is CIFAR-10's python version, whose batches are pickles; bnlab never"
                " unpickles data (unpickling can run arbitrary code). Use the binary version instead:"
                f" {ARCHIVE} from https://www.cs.toronto.edu/~kriz/cifar.html."
            )
    return None
