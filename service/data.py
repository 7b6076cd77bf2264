"""Where a run's data comes from: its shape before anything is loaded, and the data itself.

The API asks `data_shape` to refuse impossible specs (422) without reading a file; the runner asks
`load_training_data` for the samples. Built-ins come from service.ml.datasets (downloaded first when
the server allows it and they are missing); uploads from the database, decoded once per process and
cached by their SHA-256, so a worker that trains many runs on one upload decodes it once.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import replace
from pathlib import Path

from sqlalchemy.orm import Session

from service import crud_datasets, downloads
from service.config import Settings, get_settings
from service.db import session_scope
from service.ml import datasets, nets, uploads
from service.ml.config import ModelConfig
from service.ml.datasets import DatasetError, DataShape, ImageDataset
from service.schemas import DatasetSpec, RunCreate

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
    row = crud_datasets.get_dataset(session=session, dataset_id=str(dataset.id))
    if row is None:
        raise UnknownDataset(f"uploaded dataset {dataset.id} not found (never uploaded, or deleted)")
    kind: datasets.InputKind = "pixels" if row.dtype == "uint8" else "features"
    return DataShape(tuple(row.sample_shape), row.num_classes, kind, row.num_samples)


def model_config(spec: RunCreate, shape: DataShape) -> ModelConfig:
    """The spec's model for data of this shape, recording how its inputs were scaled."""
    return replace(
        spec.model_config_for_ml(),
        input_shape=shape.input_shape,
        num_classes=shape.num_classes,
        input_kind=shape.input_kind,
    )


def parameter_count(spec: RunCreate, shape: DataShape) -> int:
    """Exact trainable parameters of the spec's network on this data, for any architecture: built on
    the meta device, which allocates no memory and draws no random numbers."""
    return nets.parameter_count(model_config(spec, shape))


def shape_problem(spec: RunCreate, shape: DataShape, *, max_parameters: int) -> str | None:
    """Why the spec cannot train on data of this shape, or None."""
    if spec.model.arch != "mlp" and len(shape.input_shape) != 3:
        return (
            f"arch {spec.model.arch!r} needs image data [C, H, W]; dataset {spec.dataset.name!r} has "
            f"samples of shape {list(shape.input_shape)}: use arch 'mlp'"
        )
    try:
        parameters = parameter_count(spec, shape)
    except ValueError as exc:  # e.g. instance norm once the maps of a deep cnn are 1×1 on small images
        return f"the model cannot be built for {spec.dataset.name} data {list(shape.input_shape)}: {exc}"
    if parameters > max_parameters:
        inputs = math.prod(shape.input_shape)
        return (
            f"model has {parameters:,} parameters on {spec.dataset.name} ({inputs:,} inputs, "
            f"{shape.num_classes} classes); the limit is {max_parameters:,}"
        )
    return None


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
        found = crud_datasets.get_dataset_digest(session=session, dataset_id=dataset_id)
    if found is None:
        raise DatasetError(f"uploaded dataset {dataset_id} not found (deleted after the run was submitted?)")
    return _decoded(found[0])


@functools.lru_cache(maxsize=4)
def _decoded(sha256: str) -> ImageDataset:
    """Keyed by the content's digest: the same arrays are decoded once per process, whatever id
    (or ids: the same file uploaded twice) they are stored under."""
    with session_scope() as session:
        stored = crud_datasets.get_data_by_sha256(session=session, sha256=sha256)
    if stored is None:
        raise DatasetError(
            f"the uploaded dataset with SHA-256 {sha256} vanished while loading; retry the run"
        )
    return uploads.decode(stored.data, stored.num_classes).dataset()
