"""BNLAB_PRELOAD_DATASETS: each training process decodes the named built-ins as it starts, so the
first run on one reads them from the process's cache instead of the files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from service import config
from service.config import Settings
from service.datasets import loading
from service.ml import datasets
from service.runs.schemas import RunCreate
from tests.ml.test_datasets import sample_arrays, write_dataset


def test_only_built_ins_that_stay_cached_can_be_named() -> None:
    assert set(config.PRELOADABLE) == set(datasets.BUILTIN_SHAPES) - {datasets.SYNTHETIC}
    assert Settings(preload_datasets=" fashion-mnist, mnist ").preload_dataset_names == [
        "fashion-mnist",
        "mnist",
    ]
    assert Settings().preload_dataset_names == []  # nothing by default
    with pytest.raises(ValidationError, match="unknown dataset\\(s\\) imagenet"):
        Settings(preload_datasets="fashion-mnist,imagenet")


def test_a_preloaded_dataset_is_read_once_at_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_dataset(tmp_path / "fashion-mnist", n=7)
    monkeypatch.setenv("BNLAB_DATA_DIR", str(tmp_path))
    config.get_settings.cache_clear()
    try:
        settings = config.get_settings()
        settings.preload_datasets = "fashion-mnist"
        assert loading.preload(settings) == ["fashion-mnist"]
        # The files now hold 9 other samples, and a run on the dataset still gets the 7 decoded at
        # start: from the cache (a process would see new files only once restarted).
        write_dataset(tmp_path / "fashion-mnist", n=9)
        spec = RunCreate.model_validate({"dataset": {"name": "fashion-mnist", "val_split": 0.2}})
        train_set, val_set = loading.load_training_data(spec)
    finally:
        config.get_settings.cache_clear()
    images, labels = sample_arrays(7)
    assert torch.equal(torch.cat([train_set.x, val_set.x]), torch.from_numpy(images))
    assert torch.equal(torch.cat([train_set.y, val_set.y]), torch.from_numpy(labels).long())


def test_a_dataset_not_on_disk_is_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    settings = Settings(data_dir=tmp_path, preload_datasets="mnist")
    assert loading.preload(settings) == []  # mnist is nowhere here (Debian packages Fashion-MNIST only)
    assert "dataset mnist is not on disk" in caplog.text


def test_a_dataset_that_fails_to_load_is_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # A training process that raised as it starts would be restarted and raise again, for ever.
    (tmp_path / "fashion-mnist").mkdir()
    for name in datasets.IDX_FILES["train"]:
        (tmp_path / "fashion-mnist" / name).write_bytes(b"not gzip")
    settings = Settings(data_dir=tmp_path, preload_datasets="fashion-mnist")
    assert loading.preload(settings) == []
    assert "dataset fashion-mnist did not load" in caplog.text
