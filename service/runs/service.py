"""The runs domain's logic behind its routes (and the experiments' and the reaper's): a run's public
view, the checks a spec must pass before anything is written, and publishing its task."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from fastapi import HTTPException, status
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from service.api.busy import is_busy
from service.config import Settings
from service.datasets import loading
from service.db import session_scope
from service.ml.datasets import DataShape
from service.models import EpochMetric, Run
from service.queue import enqueue_training
from service.runs import repository as run_repo
from service.runs.budget import run_time_limit_s
from service.runs.schemas import MAX_PARAMETERS, RunCreate, RunPublic, RunSummary
from service.runs.spec import shape_problem
from service.serving import repository as serving_repo

log = logging.getLogger(__name__)


def runs_public(*, session: Session, runs: Sequence[Run]) -> list[RunPublic]:
    """A page of runs, their last epochs read in one query."""
    last = run_repo.last_epoch_metrics(session=session, runs=runs)
    return [_public(run, last.get(run.id)) for run in runs]


def run_public(*, session: Session, run: Run) -> RunPublic:
    return _public(run, run_repo.last_epoch_metric(session=session, run=run))


def _public(run: Run, last: EpochMetric | None) -> RunPublic:
    spec = RunCreate.model_validate(run.spec)
    summary = RunSummary(
        epochs_done=run.epochs_done,
        epochs_total=spec.train.epochs,
        train_loss=last.train_loss if last else None,
        train_accuracy=last.train_accuracy if last else None,
        val_loss=last.val_loss if last else None,
        val_accuracy=last.val_accuracy if last else None,
    )
    return RunPublic.model_validate(
        {
            "id": run.id,
            "name": run.name,
            "tags": run.tags or [],
            "notes": run.notes,
            "status": run.status,
            "spec": spec,
            "error": run.error,
            "cancel_requested": run.cancel_requested,
            "created_at": run.created_at,
            "started_at": run.started_at,
            "finished_at": run.finished_at,
            "summary": summary,
            "experiment_id": run.experiment_id,
        }
    )


def require_dataset(spec: RunCreate, settings: Settings, *, session: Session) -> DataShape:
    """The spec's data shape. A missing dataset, or one the model cannot train on, is the user's to
    fix: say so at submit time (422), not as a failed run later. Reads through the request's session
    before it writes anything, and ends that read before counting parameters (CPU work no transaction
    should span: on SQLite every transaction holds the write lock)."""
    missing = loading.missing_dataset(spec, settings)
    if missing is not None:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=missing)
    try:
        shape = loading.data_shape(session=session, dataset=spec.dataset)
    except loading.UnknownDataset as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=str(exc)) from exc
    session.commit()  # nothing is written yet: this only ends the read
    problem = shape_problem(spec, shape, max_parameters=MAX_PARAMETERS)
    if problem is not None:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=problem)
    return shape


def require_capacity(*, session: Session, owner: str, limit: int, adding: int = 1) -> None:
    """429 unless `adding` more active runs (a whole experiment's) stay within the key's cap."""
    active = run_repo.count_active_runs(session=session, owner=owner)
    if active + adding > limit:
        adds = f"; this request would add {adding}" if adding > 1 else ""
        raise HTTPException(
            status.HTTP_429_TOO_MANY_REQUESTS,
            detail=f"key '{owner}' already has {active} queued or running runs (limit {limit}){adds}; "
            "wait for some to finish or cancel them",
            headers={"Retry-After": "30"},
        )


def publish(run_id: str, spec: RunCreate) -> None:
    """Publish a committed run's task with the time limits its spec earns."""
    with session_scope() as session:
        limit_s = run_time_limit_s(spec, session=session)
    enqueue_training(run_id, time_limit_s=limit_s)


def publish_runs(*, session: Session, runs: Sequence[tuple[str, RunCreate]]) -> None:
    """Publish committed runs' tasks by name, outside any transaction, then note those published in
    one short transaction. Raises BrokerUnavailable; the runs not published then stay queued with no
    enqueued_at, which the reaper publishes once the broker is back."""
    published: list[str] = []
    try:
        for run_id, spec in runs:
            publish(run_id, spec)
            published.append(run_id)
    finally:
        note_enqueued(session=session, run_ids=published)


def note_enqueued(*, session: Session, run_ids: Sequence[str]) -> None:
    """Best effort: the runs are committed and published, so a busy database must not turn their
    202 into an error the client would retry (a second run). Unnoted, a run is published again by
    the reaper later, and that duplicate delivery finds the run taken (its lease) and is dropped."""
    try:
        for run_id in run_ids:
            run_repo.mark_enqueued(session=session, run_id=run_id)
        session.commit()
    except SQLAlchemyError as exc:
        if not is_busy(exc):
            raise
        session.rollback()
        log.warning("database busy: %d published runs not marked enqueued (%s)", len(run_ids), exc)


def refuse_if_aliased(
    session: Session, what: str, run_ids: list[str], experiment_id: str | None = None
) -> None:
    """409 naming the aliases that serve these runs (or the experiment): deleting would silently
    break every client that calls the alias, so the user re-points or deletes it first."""
    names = serving_repo.aliases_naming(session=session, run_ids=run_ids, experiment_id=experiment_id)
    if names:
        listed = ", ".join(names)
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            detail=f"{what} is served by the alias{'es' if len(names) > 1 else ''} {listed}: point "
            f"{'them' if len(names) > 1 else 'it'} at another run (PUT /api/v1/models/{names[0]}) or delete "
            f"{'them' if len(names) > 1 else 'it'} (DELETE /api/v1/models/{names[0]}) first",
        )
