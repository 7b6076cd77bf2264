"""IDX readers on small files written here, dataset lookup, the synthetic set, splits and inputs."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from service.ml.datasets import (
    IDX_FILES,
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
    with pytest.raises(DatasetError, match="unknown dataset 'cifar10'"):
        load_dataset("cifar10", search_dirs=[tmp_path])
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
