"""Downloads of the built-ins against a local HTTP server on 127.0.0.1 serving files the tests write:
SHA-256 verification, size caps, atomic placement, concurrent workers, and a run's data through them.
Nothing here reaches outside the machine: the mirrors are server settings pointed at the local server."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import json
import threading
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import numpy as np
import pytest

from service.config import Settings, get_settings
from service.datasets import downloads, loading
from service.runs.schemas import RunCreate
from tests.conftest import Backend
from tests.ml.test_datasets import idx_bytes


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    requests: list[str] = []

    def log_message(self, format: str, *args: object) -> None:
        QuietHandler.requests.append(self.path)


@pytest.fixture
def mirror(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """(base URL, folder it serves) of an HTTP server on a free loopback port, stopped afterwards."""
    folder = tmp_path / "mirror"
    folder.mkdir()
    QuietHandler.requests = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", folder
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def mnist_files(n: int = 20) -> dict[str, bytes]:
    rng = np.random.default_rng(3)
    images = idx_bytes(rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), 2051)
    labels = idx_bytes(np.arange(n) % 10, 2049)
    return {
        "train-images-idx3-ubyte.gz": gzip.compress(images),
        "train-labels-idx1-ubyte.gz": gzip.compress(labels),
        "t10k-images-idx3-ubyte.gz": gzip.compress(images),
        "t10k-labels-idx1-ubyte.gz": gzip.compress(labels),
    }


def settings_for(tmp_path: Path, base_url: str, digests: dict[str, str], **extra: object) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        allow_download=True,
        mnist_mirror=base_url,
        download_sha256={f"mnist/{name}": digest for name, digest in digests.items()},
        **extra,  # type: ignore[arg-type]
    )


def test_download_verifies_and_places_every_file(tmp_path: Path, mirror: tuple[str, Path]) -> None:
    base_url, folder = mirror
    files = mnist_files()
    for name, content in files.items():
        (folder / name).write_bytes(content)
    settings = settings_for(tmp_path, base_url, {n: sha(c) for n, c in files.items()})
    directory = downloads.ensure_downloaded("mnist", settings)
    assert directory == settings.data_dir / "mnist"
    assert {p.name: p.read_bytes() for p in directory.iterdir() if not p.name.startswith(".")} == files
    assert not list(directory.glob("*.part"))
    requested = len(QuietHandler.requests)
    downloads.ensure_downloaded("mnist", settings)  # present and verified: nothing fetched again
    assert len(QuietHandler.requests) == requested


def test_a_digest_mismatch_deletes_the_file_and_says_so(tmp_path: Path, mirror: tuple[str, Path]) -> None:
    base_url, folder = mirror
    files = mnist_files()
    for name, content in files.items():
        (folder / name).write_bytes(content)
    digests = {n: sha(c) for n, c in files.items()} | {"train-labels-idx1-ubyte.gz": "0" * 64}
    settings = settings_for(tmp_path, base_url, digests)
    with pytest.raises(
        downloads.DownloadError, match=r"train-labels-idx1-ubyte\.gz: SHA-256 [0-9a-f]{64} does"
    ):
        downloads.ensure_downloaded("mnist", settings)
    left = sorted(p.name for p in (settings.data_dir / "mnist").iterdir())
    assert left == [".download.lock", "train-images-idx3-ubyte.gz"]  # the bad file and its temp are gone


def test_built_in_digests_guard_the_official_files(tmp_path: Path, mirror: tuple[str, Path]) -> None:
    """Without an override the table's digest applies: a mirror serving other bytes is refused, and
    an answer larger than the official file is cut off at its size."""
    base_url, folder = mirror
    (folder / "train-images-idx3-ubyte.gz").write_bytes(b"\0" * 9_912_423)  # one byte over the official
    settings = Settings(data_dir=tmp_path / "data", allow_download=True, mnist_mirror=base_url)
    with pytest.raises(downloads.DownloadError, match="larger than 9,912,422 bytes; download stopped"):
        downloads.ensure_downloaded("mnist", settings)
    (folder / "train-images-idx3-ubyte.gz").write_bytes(b"forged")
    with pytest.raises(downloads.DownloadError, match="does not match the expected 440fcabf73cc546f"):
        downloads.ensure_downloaded("mnist", settings)


def test_size_cap_and_missing_file(tmp_path: Path, mirror: tuple[str, Path]) -> None:
    base_url, folder = mirror
    (folder / "train-images-idx3-ubyte.gz").write_bytes(b"x" * 5000)
    settings = settings_for(
        tmp_path, base_url, {"train-images-idx3-ubyte.gz": sha(b"x" * 5000)}, max_download_bytes=4096
    )
    with pytest.raises(downloads.DownloadError, match="larger than 4,096 bytes"):
        downloads.ensure_downloaded("mnist", settings)
    settings = settings_for(tmp_path, base_url, {})
    (folder / "train-images-idx3-ubyte.gz").unlink()
    with pytest.raises(downloads.DownloadError, match="download failed .*404"):
        downloads.ensure_downloaded("mnist", settings)


def test_concurrent_downloads_leave_one_verified_copy(tmp_path: Path, mirror: tuple[str, Path]) -> None:
    base_url, folder = mirror
    files = mnist_files(2000)
    for name, content in files.items():
        (folder / name).write_bytes(content)
    settings = settings_for(tmp_path, base_url, {n: sha(c) for n, c in files.items()})
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            downloads.ensure_downloaded("mnist", settings)
        except BaseException as exc:  # collected and re-raised by the test thread
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    directory = settings.data_dir / "mnist"
    assert {n: sha((directory / n).read_bytes()) for n in files} == {n: sha(c) for n, c in files.items()}
    assert QuietHandler.requests.count("/train-images-idx3-ubyte.gz") == 1  # the lock: one download
    assert not list(directory.glob("*.part"))


def test_settings_refuse_non_http_mirrors_and_bad_digests() -> None:
    with pytest.raises(ValueError, match="must be an http"):
        Settings(mnist_mirror="file:///etc/")
    with pytest.raises(ValueError, match="64 lowercase hex"):
        Settings(download_sha256={"mnist/x": "abc"})


def test_a_run_downloads_its_missing_dataset_when_allowed(
    tmp_path: Path,
    mirror: tuple[str, Path],
    sqlite_backend: Backend,
    use_backend: Callable[[Backend], None],
) -> None:
    base_url, folder = mirror
    files = mnist_files(50)
    for name, content in files.items():
        (folder / name).write_bytes(content)
    spec = RunCreate.model_validate({"dataset": {"name": "mnist"}})
    use_backend(sqlite_backend)
    assert loading.missing_dataset(spec, get_settings()) is not None  # downloads off: a 422 at submit
    digests = {f"mnist/{n}": sha(c) for n, c in files.items()}
    sqlite_backend.env |= {
        "BNLAB_ALLOW_DOWNLOAD": "1",
        "BNLAB_MNIST_MIRROR": base_url,
        "BNLAB_DOWNLOAD_SHA256": json.dumps(digests),
    }
    use_backend(sqlite_backend)
    assert loading.missing_dataset(spec, get_settings()) is None
    train, val = loading.load_training_data(spec)
    assert (len(train), len(val), train.sample_shape) == (40, 10, (1, 28, 28))
    assert (get_settings().data_dir / "mnist" / "train-labels-idx1-ubyte.gz").read_bytes() == files[
        "train-labels-idx1-ubyte.gz"
    ]
