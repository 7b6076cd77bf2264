"""Where a run's data comes from: its shape before anything is loaded, and the data itself.

The API asks `data_shape` to refuse impossible specs (422) without reading a file; the runner asks
`load_training_data` for the samples. Built-ins come from service.ml.datasets (downloaded first when
the server allows it and they are missing); uploads from the database, decoded once per process and
cached by their SHA-256, so a worker that trains many runs on one upload decodes it once.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

from sqlalchemy.orm import Session

from service.config import Settings, get_settings
from service.datasets import downloads
from service.datasets import repository as dataset_repo
from service.db import session_scope
from service.ml import datasets, uploads
from service.ml.datasets import DatasetError, DataShape, ImageDataset
from service.runs.schemas import DatasetSpec, RunCreate

UPLOADED = "uploaded"

log = logging.getLogger(__name__)


class UnknownDataset(LookupError):
    """The spec names an uploaded dataset that does not exist (or was deleted)."""


def search_dirs(settings: Settings) -> list[Path]:
    return [settings.data_dir, datasets.SYSTEM_DATASET_DIR]


def data_shape(*, session: Session, dataset: DatasetSpec) -> DataShape:
    """The shape of a spec's data, from the built-ins' table or the upload's row (no data read)."""
    if dataset.name != UPLOADED:
        return datasets.BUILTIN_SHAPES[dataset.name]
    row = dataset_repo.get_dataset(session=session, dataset_id=str(dataset.id))
    if row is None:
        raise UnknownDataset(f"uploaded dataset {dataset.id} not found (never uploaded, or deleted)")
    kind: datasets.InputKind = "pixels" if row.dtype == "uint8" else "features"
    return DataShape(tuple(row.sample_shape), row.num_classes, kind, row.num_samples)


def missing_dataset(spec: RunCreate, settings: Settings) -> str | None:
    """A message when a built-in's files are absent and cannot be downloaded; None otherwise."""
    name = spec.dataset.name
    if not datasets.needs_files(name) or downloads.can_download(name, settings):
        return None
    if datasets.find_dataset_dir(name, search_dirs(settings)) is not None:
        return None
    return datasets.missing_dataset_message(name, search_dirs(settings))


def load_training_data(spec: RunCreate) -> tuple[ImageDataset, ImageDataset]:
    """The spec's training and validation splits (the last val_split of the training data)."""
    full = _load_uploaded(str(spec.dataset.id)) if spec.dataset.name == UPLOADED else _load_builtin(spec)
    if spec.dataset.limit is not None and spec.dataset.name != datasets.SYNTHETIC:
        full = full.take(slice(0, spec.dataset.limit))
    return datasets.train_val_split(full, spec.dataset.val_split)


def preload(settings: Settings) -> list[str]:
    """Load the datasets settings.preload_datasets names into this process's cache of built-ins (see
    datasets.load_dataset), skipping those not on disk (never downloading) and those that fail to
    load (a training process that raised here would be restarted, and fail again, for ever; a run
    on such a dataset fails with the reason instead); returns those loaded."""
    dirs, loaded = search_dirs(settings), []
    for name in settings.preload_dataset_names:
        if datasets.needs_files(name) and datasets.find_dataset_dir(name, dirs) is None:
            log.warning("preload: dataset %s is not on disk; its first run will load it", name)
            continue
        try:
            datasets.load_dataset(name, search_dirs=dirs, split="train")
        except DatasetError as exc:
            log.error("preload: dataset %s did not load: %s", name, exc)
            continue
        loaded.append(name)
    return loaded


def _load_builtin(spec: RunCreate) -> ImageDataset:
    settings = get_settings()
    name, dirs = spec.dataset.name, search_dirs(settings)
    if (
        datasets.needs_files(name)
        and datasets.find_dataset_dir(name, dirs) is None
        and downloads.can_download(name, settings)
    ):
        downloads.ensure_downloaded(name, settings)
    limit = spec.dataset.limit if name == datasets.SYNTHETIC else None  # synthetic: how many to make
    return datasets.load_dataset(name, search_dirs=dirs, split="train", limit=limit)


def _load_uploaded(dataset_id: str) -> ImageDataset:
    with session_scope() as session:
        found = dataset_repo.get_dataset_digest(session=session, dataset_id=dataset_id)
    if found is None:
        raise DatasetError(f"uploaded dataset {dataset_id} not found (deleted after the run was submitted?)")
    return _decoded(found[0])


@functools.lru_cache(maxsize=4)
def _decoded(sha256: str) -> ImageDataset:
    """Keyed by the content's digest: the same arrays are decoded once per process, whatever id
    (or ids: the same file uploaded twice) they are stored under."""
    with session_scope() as session:
        stored = dataset_repo.get_data_by_sha256(session=session, sha256=sha256)
    if stored is None:
        raise DatasetError(
            f"the uploaded dataset with SHA-256 {sha256} vanished while loading; retry the run"
        )
    return uploads.decode(stored.data, stored.num_classes).dataset()
