"""Data functions for runs, metrics and artifacts. They use the caller's session and never commit:
the caller (the request dependency or a task's session_scope) owns the transaction."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from service.models import EpochMetric, ModelArtifact, Run, RunStatus, utcnow
from service.schemas import RunCreate


def create_run(*, session: Session, spec: RunCreate) -> Run:
    run = Run(name=spec.name, spec=spec.model_dump(mode="json"), status=RunStatus.queued.value)
    session.add(run)
    session.flush()
    return run


def get_run(*, session: Session, run_id: str) -> Run | None:
    return session.get(Run, run_id)


def get_run_spec(*, session: Session, run_id: str) -> dict[str, object]:
    spec: dict[str, object] = session.scalars(select(Run.spec).where(Run.id == run_id)).one()
    return spec


def list_runs(
    *, session: Session, status: RunStatus | None, limit: int, offset: int
) -> tuple[Sequence[Run], int]:
    query = select(Run)
    if status is not None:
        query = query.where(Run.status == status.value)
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    page = session.scalars(query.order_by(Run.created_at.desc(), Run.id).limit(limit).offset(offset)).all()
    return page, total


def last_epoch_metric(*, session: Session, run: Run) -> EpochMetric | None:
    if run.epochs_done == 0:
        return None
    return session.get(EpochMetric, (run.id, run.epochs_done))


def list_epoch_metrics(*, session: Session, run_id: str) -> Sequence[EpochMetric]:
    return session.scalars(
        select(EpochMetric).where(EpochMetric.run_id == run_id).order_by(EpochMetric.epoch)
    ).all()


def request_cancel(*, session: Session, run: Run) -> None:
    """A queued run is cancelled at once; a running one is flagged and stops at its next step."""
    run.cancel_requested = True
    if run.status == RunStatus.queued:
        run.status = RunStatus.cancelled.value
        run.finished_at = utcnow()


def claim_run(*, session: Session, run_id: str, worker: str) -> bool:
    """Move a run from queued to running in one conditional UPDATE; False if it was not queued
    (cancelled meanwhile, or already taken by another delivery of the same message)."""
    result = session.execute(
        update(Run)
        .where(Run.id == run_id, Run.status == RunStatus.queued.value)
        .values(
            status=RunStatus.running.value,
            worker=worker,
            attempts=Run.attempts + 1,
            started_at=utcnow(),
            updated_at=utcnow(),
        )
        .execution_options(synchronize_session=False)
    )
    return bool(getattr(result, "rowcount", 0) == 1)


def is_cancel_requested(*, session: Session, run_id: str) -> bool:
    return bool(session.scalar(select(Run.cancel_requested).where(Run.id == run_id)))


def record_epoch(
    *,
    session: Session,
    run_id: str,
    epoch: int,
    train_loss: float,
    train_accuracy: float,
    val_loss: float,
    val_accuracy: float,
    seconds: float,
) -> None:
    session.add(
        EpochMetric(
            run_id=run_id,
            epoch=epoch,
            train_loss=train_loss,
            train_accuracy=train_accuracy,
            val_loss=val_loss,
            val_accuracy=val_accuracy,
            seconds=seconds,
        )
    )
    session.execute(
        update(Run)
        .where(Run.id == run_id)
        .values(epochs_done=epoch, updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )


def finish_run(*, session: Session, run_id: str, status: RunStatus, error: str | None = None) -> None:
    session.execute(
        update(Run)
        .where(Run.id == run_id)
        .values(status=status.value, error=error, finished_at=utcnow(), updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )


def save_artifact(
    *, session: Session, run_id: str, weights: bytes, model_config: dict[str, object], sha256: str
) -> ModelArtifact:
    artifact = ModelArtifact(
        run_id=run_id,
        version=1,
        weights=weights,
        model_config=model_config,
        sha256=sha256,
        size_bytes=len(weights),
    )
    session.add(artifact)
    return artifact


def get_artifact(*, session: Session, run_id: str, version: int = 1) -> ModelArtifact | None:
    return session.get(ModelArtifact, (run_id, version))
