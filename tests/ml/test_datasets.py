"""IDX readers on small files written here, dataset lookup, the synthetic set, splits and inputs."""

from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from service.ml import cifar, mnist1d
from service.ml import datasets as datasets_module
from service.ml.datasets import (
    BUILTIN_SHAPES,
    CIFAR10,
    IDX_FILES,
    MNIST1D,
    SYNTHETIC,
    SYSTEM_DATASET_DIR,
    DatasetError,
    ImageDataset,
    find_dataset_dir,
    load_dataset,
    make_synthetic,
    missing_dataset_message,
    read_idx_images,
    read_idx_labels,
    to_inputs,
    to_inputs_once,
    train_val_split,
)


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def sample_arrays(n: int = 5) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n, dtype=np.uint8)


def write_dataset(
    directory: Path, n: int = 5, *, gz: bool = True, splits: tuple[str, ...] = ("train",)
) -> None:
    images, labels = sample_arrays(n)
    for split in splits:
        image_name, label_name = (f if gz else f.removesuffix(".gz") for f in IDX_FILES[split])
        write(directory / image_name, idx_bytes(images, 2051))
        write(directory / label_name, idx_bytes(labels, 2049))


@pytest.mark.parametrize("name", ["images.idx", "images.idx.gz"])
def test_read_idx_round_trip(tmp_path: Path, name: str) -> None:
    images, labels = sample_arrays()
    x = read_idx_images(write(tmp_path / name, idx_bytes(images, 2051)))
    y = read_idx_labels(write(tmp_path / f"labels-{name}", idx_bytes(labels, 2049)))
    assert (x.dtype, tuple(x.shape), y.dtype, tuple(y.shape)) == (torch.uint8, (5, 28, 28), torch.int64, (5,))
    assert np.array_equal(x.numpy(), images)
    assert np.array_equal(y.numpy(), labels)


def test_bad_magic_names_the_file(tmp_path: Path) -> None:
    images, labels = sample_arrays()
    path = write(tmp_path / "swapped.gz", idx_bytes(labels, 2049))
    with pytest.raises(DatasetError, match=r"swapped\.gz.*magic 2049, expected 2051"):
        read_idx_images(path)
    with pytest.raises(DatasetError, match="magic"):
        read_idx_labels(write(tmp_path / "img", idx_bytes(images, 2051)))


@pytest.mark.parametrize("cut", [3, 100, -1])
def test_truncated_file_names_the_file(tmp_path: Path, cut: int) -> None:
    data = idx_bytes(sample_arrays()[0], 2051)
    path = write(tmp_path / "short-images", data[:cut])
    with pytest.raises(DatasetError, match="short-images"):
        read_idx_images(path)


def test_size_mismatch_with_extra_bytes(tmp_path: Path) -> None:
    path = write(tmp_path / "long-labels.gz", idx_bytes(sample_arrays()[1], 2049) + b"\0")
    with pytest.raises(DatasetError, match=r"long-labels\.gz.*does not match its header"):
        read_idx_labels(path)


def test_corrupt_gzip_stream_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.gz"
    path.write_bytes(gzip.compress(idx_bytes(sample_arrays()[0], 2051))[:-20])
    with pytest.raises(DatasetError, match=r"broken\.gz"):
        read_idx_images(path)


def test_find_dataset_dir_takes_the_first_complete_dir(tmp_path: Path) -> None:
    incomplete, raw, gz = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    write(incomplete / "mnist" / IDX_FILES["train"][0], idx_bytes(sample_arrays()[0], 2051))  # no labels
    write_dataset(raw / "mnist", gz=False)
    write_dataset(gz / "mnist")
    assert find_dataset_dir("mnist", [tmp_path / "missing", incomplete, raw, gz]) == raw / "mnist"
    assert find_dataset_dir("mnist", [gz, raw]) == gz / "mnist"
    assert find_dataset_dir("fashion-mnist", [raw, gz]) is None
    assert find_dataset_dir("mnist", []) is None


def test_missing_dataset_message_says_what_and_where(tmp_path: Path) -> None:
    message = missing_dataset_message("fashion-mnist", [tmp_path, SYSTEM_DATASET_DIR])
    for needed in (*IDX_FILES["train"], str(tmp_path / "fashion-mnist"), "/usr/share/datasets/fashion-mnist"):
        assert needed in message
    assert "apt-get install dataset-fashion-mnist" in message


def test_load_dataset_from_files_with_limit_and_cache(tmp_path: Path) -> None:
    write_dataset(tmp_path / "mnist", n=7, gz=False, splits=("train", "test"))
    full = load_dataset("mnist", search_dirs=[tmp_path])
    assert (len(full), full.num_classes, full.sample_shape) == (7, 10, (1, 28, 28))
    assert np.array_equal(full.x.numpy(), sample_arrays(7)[0])
    again = load_dataset("mnist", search_dirs=[tmp_path], limit=3)
    assert again.x.data_ptr() == full.x.data_ptr()  # served from the process cache, not re-read
    assert torch.equal(again.y, full.y[:3])
    assert len(load_dataset("mnist", search_dirs=[tmp_path], split="test")) == 7


def test_load_dataset_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist", search_dirs=[tmp_path])
    with pytest.raises(DatasetError, match="unknown dataset 'imagenet'"):
        load_dataset("imagenet", search_dirs=[tmp_path])
    write_dataset(tmp_path / "mnist")  # train only
    with pytest.raises(DatasetError, match="t10k-images-idx3-ubyte.gz"):
        load_dataset("mnist", search_dirs=[tmp_path], split="test")


def test_synthetic_is_deterministic_and_well_formed() -> None:
    a, b, other = make_synthetic(500, seed=3), make_synthetic(500, seed=3), make_synthetic(500, seed=4)
    assert (a.x.dtype, tuple(a.x.shape), a.y.dtype, tuple(a.y.shape)) == (
        torch.uint8,
        (500, 28, 28),
        torch.int64,
        (500,),
    )
    assert torch.equal(a.x, b.x)
    assert torch.equal(a.y, b.y)
    assert not torch.equal(a.x, other.x)
    assert set(a.y.tolist()) == set(range(10))
    class_means = torch.stack([a.x[a.y == c].float().mean(0) for c in range(10)])
    assert torch.cdist(class_means.flatten(1), class_means.flatten(1)).add(torch.eye(10) * 1e9).min() > 100


def test_synthetic_through_load_dataset() -> None:
    train = load_dataset(SYNTHETIC, search_dirs=[], limit=300)
    test = load_dataset(SYNTHETIC, search_dirs=[], split="test")
    assert (len(train), len(test), len(load_dataset(SYNTHETIC, search_dirs=[]))) == (300, 2000, 10_000)
    assert not torch.equal(train.x, test.x[:300])


def test_train_val_split_holds_out_the_last_fraction() -> None:
    ds = ImageDataset(
        torch.arange(10, dtype=torch.uint8)[:, None, None].expand(10, 28, 28), torch.arange(10), 10
    )
    train, val = train_val_split(ds, 0.2)
    assert train.y.tolist() == list(range(8))
    assert val.y.tolist() == [8, 9]
    assert torch.equal(val.x[:, 0, 0], torch.tensor([8, 9], dtype=torch.uint8))
    with pytest.raises(ValueError, match="val_split"):
        train_val_split(ds, 1.0)


def test_to_inputs_scales_to_unit_float() -> None:
    x = torch.tensor([[[0, 51], [255, 102]]], dtype=torch.uint8)
    out = to_inputs(x)
    assert (out.dtype, tuple(out.shape)) == (torch.float32, (1, 1, 2, 2))
    torch.testing.assert_close(out, torch.tensor([[[[0.0, 0.2], [1.0, 0.4]]]]))


def test_real_fashion_mnist_train_split() -> None:
    """CI installs Debian's dataset-fashion-mnist; a missing package must fail here, not skip."""
    ds = load_dataset("fashion-mnist", search_dirs=[SYSTEM_DATASET_DIR])
    assert tuple(ds.x.shape) == (60_000, 28, 28)
    assert ds.x.dtype == torch.uint8
    assert torch.bincount(ds.y).tolist() == [6000] * 10


# ---------------------------------------------------------------------------------------- any shape


def test_to_inputs_keeps_channels_and_passes_features_through() -> None:
    rgb = torch.tensor([[[[0, 255]], [[51, 102]], [[255, 0]]]], dtype=torch.uint8)  # [1, 3, 1, 2]
    out = to_inputs(rgb)
    assert (out.dtype, tuple(out.shape)) == (torch.float32, (1, 3, 1, 2))
    torch.testing.assert_close(out[0, 1], torch.tensor([[0.2, 0.4]]))
    features = torch.tensor([[-3.5, 0.0, 1e6]], dtype=torch.float32)
    assert torch.equal(to_inputs(features), features)  # floats are used as they are, not scaled


def test_to_inputs_once_reuses_a_conversion_of_the_same_tensor_only(monkeypatch: pytest.MonkeyPatch) -> None:
    images = torch.randint(0, 256, (10, 4, 4), dtype=torch.uint8)
    first = to_inputs_once(images[:8])
    torch.testing.assert_close(first, to_inputs(images[:8]), rtol=0, atol=0)
    assert to_inputs_once(images[:8]) is first  # a new view of the same bytes: reused
    assert to_inputs_once(images[2:]) is not first  # other bytes, or other shapes: converted
    assert to_inputs_once(images[:6]) is not first
    assert to_inputs_once(images[:8].clone()) is not first  # same values elsewhere: converted
    # Beyond the memory cap the least recently used go, and an entry alone too large is not kept.
    monkeypatch.setattr(datasets_module, "CONVERTED_CACHE_BYTES", 2 * 8 * 16 * 4)
    kept = to_inputs_once(images[:8])
    to_inputs_once(images[1:9])
    to_inputs_once(images[2:10])
    assert to_inputs_once(images[:8]) is not kept
    large = torch.zeros(100, 4, 4, dtype=torch.uint8)
    assert to_inputs_once(large) is not to_inputs_once(large)


def test_sample_shape_and_input_kind() -> None:
    labels = torch.zeros(2, dtype=torch.int64)
    gray = ImageDataset(torch.zeros(2, 5, 6, dtype=torch.uint8), labels, 10)
    rgb = ImageDataset(torch.zeros(2, 3, 5, 6, dtype=torch.uint8), labels, 10)
    feats = ImageDataset(torch.zeros(2, 40), labels, 10)
    assert [gray.sample_shape, rgb.sample_shape, feats.sample_shape] == [(1, 5, 6), (3, 5, 6), (40,)]
    assert [gray.input_kind, rgb.input_kind, feats.input_kind] == ["pixels", "pixels", "features"]


# ---------------------------------------------------------------------------------------- MNIST-1D


def test_mnist1d_is_deterministic_standardised_and_balanced() -> None:
    a, b = mnist1d.make_dataset(), mnist1d.make_dataset()
    assert (a.x.shape, a.x.dtype, a.y.dtype, a.x_test.shape, a.y_test.shape) == (
        (4000, 40),
        np.float32,
        np.int64,
        (1000, 40),
        (1000,),
    )
    assert np.array_equal(a.x, b.x)
    assert np.array_equal(a.y_test, b.y_test)
    other = mnist1d.make_dataset(mnist1d.Mnist1dArgs(seed=7))
    assert not np.array_equal(a.x, other.x)
    every = np.concatenate([a.x, a.x_test])
    assert abs(float(every.mean())) < 1e-5
    assert abs(float(every.std()) - 1) < 1e-5
    counts = np.bincount(np.concatenate([a.y, a.y_test]))
    assert counts.tolist() == [500] * 10  # 500 per class, shuffled across the split
    assert set(np.bincount(a.y).tolist()) != {400}  # shuffled: the split is not class-stratified


def test_mnist1d_is_learnable_but_not_linearly() -> None:
    """The paper's point: a linear model does poorly (its logistic regression: 32 %), far above chance
    all the same; with the labels shuffled the same fit is at chance."""
    data = mnist1d.make_dataset()

    def linear_test_accuracy(labels: np.ndarray) -> float:
        weights = np.linalg.lstsq(np.c_[data.x, np.ones(len(data.x))], np.eye(10)[labels], rcond=None)[0]
        return float(
            ((np.c_[data.x_test, np.ones(len(data.x_test))] @ weights).argmax(1) == data.y_test).mean()
        )

    assert 0.18 < linear_test_accuracy(data.y) < 0.5
    assert linear_test_accuracy(np.random.default_rng(0).permutation(data.y)) < 0.15


def test_mnist1d_gaussian_smoothing_matches_scipys_reflect_mode() -> None:
    x = np.zeros(20)
    x[0] = 1.0  # an impulse at the border: half of the kernel is reflected back onto the signal
    smooth = mnist1d._gaussian_smooth(x, sigma=2.0)
    offsets = np.arange(-8, 9)
    kernel = np.exp(-0.5 * (offsets / 2.0) ** 2)
    kernel /= kernel.sum()
    # 'reflect' pads d c b a | a b c d: the impulse at 0 has a mirror image at -1, so the output at i
    # is the kernel's weight at distance i plus the one at distance i + 1 (zero beyond 8).
    at_distance = np.pad(kernel[8:], (0, 12))
    expected = at_distance[:20] + at_distance[1:21]
    np.testing.assert_allclose(smooth, expected, rtol=1e-12, atol=1e-15)
    assert smooth.sum() == pytest.approx(1.0)


def test_mnist1d_through_load_dataset_and_builtin_shape() -> None:
    train = load_dataset(MNIST1D, search_dirs=[], limit=100)
    test = load_dataset(MNIST1D, search_dirs=[], split="test")
    shape = BUILTIN_SHAPES[MNIST1D]
    assert (train.sample_shape, train.num_classes, train.input_kind) == (
        shape.input_shape,
        shape.num_classes,
        shape.input_kind,
    )
    assert (len(train), len(test), len(load_dataset(MNIST1D, search_dirs=[]))) == (
        100,
        1000,
        shape.train_samples,
    )
    assert train.x.dtype == torch.float32


# ---------------------------------------------------------------------------------------- CIFAR-10


def cifar_records(n: int, seed: int, labels: np.ndarray | None = None) -> bytes:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, n, dtype=np.uint8) if labels is None else labels.astype(np.uint8)
    pixels = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    return np.concatenate([y[:, None], pixels], axis=1).tobytes()


def cifar_files(n: int = 3) -> dict[str, bytes]:
    names = [*cifar.SPLIT_FILES["train"], *cifar.SPLIT_FILES["test"]]
    return {name: cifar_records(n, seed) for seed, name in enumerate(names)}


def write_cifar_archive(
    path: Path, files: dict[str, bytes], extra: list[tarfile.TarInfo] | None = None
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for info in extra or []:
            tar.addfile(info, io.BytesIO(b"\0" * info.size) if info.isreg() else None)
        for name, data in files.items():
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def expected_cifar(files: dict[str, bytes], names: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    records = np.frombuffer(b"".join(files[n] for n in names), dtype=np.uint8).reshape(-1, 3073)
    return records[:, 1:].reshape(-1, 3, 32, 32), records[:, 0].astype(np.int64)


@pytest.mark.parametrize("layout", ["flat", "batches-dir", "archive"])
def test_cifar10_binary_version_in_each_layout(tmp_path: Path, layout: str) -> None:
    files = cifar_files()
    directory = tmp_path / "cifar10"
    if layout == "archive":
        write_cifar_archive(directory / cifar.ARCHIVE, files)
    else:
        target = directory if layout == "flat" else directory / cifar.MEMBER_DIR
        for name, data in files.items():
            write(target / name, data)
    train = load_dataset(CIFAR10, search_dirs=[tmp_path / "elsewhere", tmp_path])
    test = load_dataset(CIFAR10, search_dirs=[tmp_path], split="test")
    x, y = expected_cifar(files, cifar.SPLIT_FILES["train"])
    assert (train.sample_shape, train.input_kind, len(train), len(test)) == ((3, 32, 32), "pixels", 15, 3)
    assert np.array_equal(train.x.numpy(), x)
    assert np.array_equal(train.y.numpy(), y)
    # R, G and B planes in that order: the first pixel of the G plane is byte 1 + 1024 of a record.
    assert int(train.x[0, 1, 0, 0]) == files["data_batch_1.bin"][1 + 1024]
    assert BUILTIN_SHAPES[CIFAR10].input_shape == train.sample_shape


def test_cifar10_archive_members_are_read_in_memory_and_links_never_followed(tmp_path: Path) -> None:
    files = cifar_files()
    outside = tmp_path / "secret.bin"
    outside.write_bytes(cifar_records(5, 99))
    link = tarfile.TarInfo(f"{cifar.MEMBER_DIR}/data_batch_1.bin")
    link.type, link.linkname = tarfile.SYMTYPE, str(outside)
    absolute = tarfile.TarInfo(f"/{cifar.MEMBER_DIR}/data_batch_2.bin")
    absolute.size = 3073
    dotdot = tarfile.TarInfo(f"../{cifar.MEMBER_DIR}/data_batch_3.bin")
    dotdot.size = 3073
    del files["data_batch_1.bin"]
    archive = write_cifar_archive(tmp_path / "cifar10" / cifar.ARCHIVE, files, extra=[link, absolute, dotdot])
    with pytest.raises(DatasetError, match=r"has no cifar-10-batches-bin/data_batch_1\.bin"):
        cifar.read_split(archive.parent, "train")
    assert sorted(p.name for p in archive.parent.iterdir()) == [cifar.ARCHIVE]  # nothing extracted


def test_cifar10_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"data_batch_1\.bin: 3074 bytes is not a whole number of 3073"):
        cifar.parse_batch(cifar_records(1, 0) + b"\0", "data_batch_1.bin")
    with pytest.raises(DatasetError, match="record 1 has label 10, outside 0..9"):
        cifar.parse_batch(cifar_records(2, 0, labels=np.array([3, 10])), "x.bin")
    (tmp_path / "cifar10").mkdir()
    (tmp_path / "cifar10" / cifar.ARCHIVE).write_bytes(b"not a gzip stream")
    with pytest.raises(DatasetError, match="cannot read the archive"):
        load_dataset(CIFAR10, search_dirs=[tmp_path])


def test_cifar10_python_version_is_refused_and_why(tmp_path: Path) -> None:
    (tmp_path / "cifar10" / "cifar-10-batches-py").mkdir(parents=True)
    with pytest.raises(DatasetError, match="python version, whose batches are pickles") as caught:
        load_dataset(CIFAR10, search_dirs=[tmp_path])
    assert "cifar-10-binary.tar.gz" in str(caught.value)
    assert find_dataset_dir(CIFAR10, [tmp_path]) is None
