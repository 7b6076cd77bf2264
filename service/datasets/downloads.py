"""Optional downloads of the built-in datasets, with BNLAB_ALLOW_DOWNLOAD=1 (off by default).

Files come from the canonical mirrors (server settings, never client input) into
`$BNLAB_DATA_DIR/<dataset>/`, where the readers look first. Each file is streamed to a uniquely named
temporary file in that directory, capped in size, its SHA-256 checked, and only then renamed into
place (atomic on one file system): a reader never sees a partial or unverified file. A file lock per
dataset directory makes concurrent workers wait for one download instead of repeating it. A digest
mismatch deletes the file and fails the run with a message saying so.

The digests are data (`REMOTE_FILES`), from TensorFlow Datasets' url_checksums (mnist.txt,
fashion_mnist.txt, cifar10.txt), which list size and SHA-256 of these exact files; torchvision
lists only MD5s. BNLAB_DOWNLOAD_SHA256 replaces one (a republished file, or the tests' own files).
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from service.config import Settings
from service.ml.errors import DatasetError

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
TIMEOUT_S = 60  # per socket operation, not for the whole file


@dataclass(frozen=True)
class RemoteFile:
    name: str
    size: int  # bytes of the official file: a larger answer is cut off there
    sha256: str


_IDX = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz")
REMOTE_FILES: dict[str, tuple[RemoteFile, ...]] = {
    "mnist": (
        RemoteFile(_IDX[0], 9_912_422, "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"),
        RemoteFile(_IDX[1], 28_881, "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"),
        RemoteFile(_IDX[2], 1_648_877, "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"),
        RemoteFile(
            "t10k-labels-idx1-ubyte.gz",
            4_542,
            "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
        ),
    ),
    "fashion-mnist": (
        RemoteFile(_IDX[0], 26_421_880, "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84"),
        RemoteFile(_IDX[1], 29_515, "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845"),
        RemoteFile(_IDX[2], 4_422_102, "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073"),
        RemoteFile(
            "t10k-labels-idx1-ubyte.gz",
            5_148,
            "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
        ),
    ),
    "cifar10": (
        RemoteFile(
            "cifar-10-binary.tar.gz",
            170_052_171,
            "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd",
        ),
    ),
}


class DownloadError(DatasetError):
    """A download failed or did not verify; the message is for the user (it ends the run)."""


def mirror(name: str, settings: Settings) -> str:
    mirrors = {
        "mnist": settings.mnist_mirror,
        "fashion-mnist": settings.fashion_mnist_mirror,
        "cifar10": settings.cifar10_mirror,
    }
    return mirrors[name]


def can_download(name: str, settings: Settings) -> bool:
    return settings.allow_download and name in REMOTE_FILES


def ensure_downloaded(name: str, settings: Settings) -> Path:
    """Download the files of dataset `name` that are not yet in `data_dir/name`; return that folder."""
    if not can_download(name, settings):
        raise DownloadError(f"downloading {name!r} is not enabled (BNLAB_ALLOW_DOWNLOAD=1)")
    directory = settings.data_dir / name
    directory.mkdir(parents=True, exist_ok=True)
    with _locked(directory / ".download.lock"):
        for remote in REMOTE_FILES[name]:
            target = directory / remote.name
            if target.is_file():  # only ever renamed into place after its digest matched
                continue
            expected = settings.download_sha256.get(f"{name}/{remote.name}", remote.sha256)
            # The official size caps the official file; an overridden digest means another file.
            cap = remote.size if expected == remote.sha256 else settings.max_download_bytes
            url = mirror(name, settings) + remote.name
            log.info("downloading %s to %s", url, target)
            fetch_verified(url, target, sha256=expected, max_bytes=min(cap, settings.max_download_bytes))
    return directory


def fetch_verified(url: str, target: Path, *, sha256: str, max_bytes: int) -> None:
    """Stream `url` into `target` through a unique temporary file; rename only if the digest matches."""
    fd, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            digest = _stream(url, out, max_bytes=max_bytes)
            out.flush()
            os.fsync(out.fileno())
        if digest != sha256:
            raise DownloadError(
                f"{url}: SHA-256 {digest} does not match the expected {sha256}; the file was deleted. "
                "The mirror may serve a different or corrupt file."
            )
        os.replace(temporary, target)
    finally:
        Path(temporary).unlink(missing_ok=True)  # gone already after a successful rename


def _stream(url: str, out: BinaryIO, *, max_bytes: int) -> str:
    digest, total = hashlib.sha256(), 0
    try:
        with _OPENER.open(url, timeout=TIMEOUT_S) as response:
            while chunk := response.read(CHUNK_BYTES):
                total += len(chunk)
                if total > max_bytes:
                    raise DownloadError(f"{url}: larger than {max_bytes:,} bytes; download stopped")
                digest.update(chunk)
                out.write(chunk)
    except (urllib.error.URLError, OSError) as exc:
        raise DownloadError(f"{url}: download failed ({exc})") from exc
    return digest.hexdigest()


def _opener() -> urllib.request.OpenerDirector:
    """HTTP(S) only, redirects included: no file:// or ftp:// handler a redirect could reach."""
    opener = urllib.request.OpenerDirector()
    for handler in (
        urllib.request.HTTPHandler(),
        urllib.request.HTTPSHandler(),
        urllib.request.HTTPRedirectHandler(),
        urllib.request.HTTPDefaultErrorHandler(),
        urllib.request.HTTPErrorProcessor(),
    ):
        opener.add_handler(handler)
    return opener


_OPENER = _opener()


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        yield
