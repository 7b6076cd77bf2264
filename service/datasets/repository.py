"""Data functions for uploaded datasets. Like service.runs.repository, they use the caller's session and never
commit: the caller owns the transaction."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session, defer

from service.ml.checkpoints import sha256_hex
from service.ml.uploads import CheckedArrays, encode
from service.models import Dataset, Run, RunStatus

ACTIVE = (RunStatus.queued.value, RunStatus.running.value)


def create_dataset(*, session: Session, name: str, owner: str | None, arrays: CheckedArrays) -> Dataset:
    """Store the checked arrays in the server's own encoding (safetensors), with their SHA-256."""
    data = encode(arrays)
    dataset = Dataset(
        name=name,
        owner=owner,
        sample_shape=list(arrays.sample_shape),
        num_classes=arrays.num_classes,
        num_samples=len(arrays.y),
        dtype=str(arrays.x.dtype),
        format="safetensors",
        data=data,
        sha256=sha256_hex(data),
        size_bytes=len(data),
    )
    session.add(dataset)
    session.flush()
    return dataset


def get_dataset(*, session: Session, dataset_id: str) -> Dataset | None:
    """The dataset's row without its data (listing and shape checks never need the bytes)."""
    return session.scalars(
        select(Dataset).where(Dataset.id == dataset_id).options(defer(Dataset.data))
    ).one_or_none()


def list_datasets(*, session: Session, limit: int, offset: int) -> tuple[Sequence[Dataset], int]:
    total = session.scalar(select(func.count()).select_from(Dataset)) or 0
    page = session.scalars(
        select(Dataset)
        .options(defer(Dataset.data))
        .order_by(Dataset.created_at.desc(), Dataset.id)
        .limit(limit)
        .offset(offset)
    ).all()
    return page, total


@dataclass(frozen=True)
class StoredData:
    data: bytes
    sha256: str
    num_classes: int


def get_data_by_sha256(*, session: Session, sha256: str) -> StoredData | None:
    """The stored arrays with this digest (any of the datasets that hold them)."""
    row = session.execute(
        select(Dataset.data, Dataset.sha256, Dataset.num_classes).where(Dataset.sha256 == sha256).limit(1)
    ).one_or_none()
    return None if row is None else StoredData(row.data, row.sha256, row.num_classes)


def get_dataset_digest(*, session: Session, dataset_id: str) -> tuple[str, int] | None:
    """(sha256, num_classes) without the bytes: enough to find the dataset in a process cache."""
    row = session.execute(
        select(Dataset.sha256, Dataset.num_classes).where(Dataset.id == dataset_id)
    ).one_or_none()
    return None if row is None else (row.sha256, row.num_classes)


def active_runs_using(*, session: Session, dataset_id: str) -> list[str]:
    """Ids of the queued or running runs whose spec trains on the dataset. Specs are JSON on both
    backends; the active runs are few (capped per key), so they are filtered here, not in SQL."""
    rows = session.execute(select(Run.id, Run.spec).where(Run.status.in_(ACTIVE))).all()
    return [row.id for row in rows if (row.spec.get("dataset") or {}).get("id") == dataset_id]


def delete_dataset(*, session: Session, dataset: Dataset) -> None:
    session.delete(dataset)
    session.flush()
