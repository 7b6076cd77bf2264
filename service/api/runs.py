"""/api/v1/runs: submit training jobs, follow them, cancel them, and query the trained models."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Response, status
from sqlalchemy.orm import Session

from service import crud, inference
from service.api.deps import RunDep, SessionDep, SettingsDep
from service.api.security import READ, PrincipalDep
from service.config import Settings
from service.ml import datasets
from service.models import Run, RunStatus
from service.queue import BrokerUnavailable
from service.runner import publish
from service.schemas import (
    EpochMetricPublic,
    Message,
    PredictRequest,
    PredictResponse,
    RunCreate,
    RunMetricsPublic,
    RunPublic,
    RunsPublic,
    RunSummary,
)

router = APIRouter(prefix="/api/v1/runs", tags=["runs"])


def run_public(*, session: Session, run: Run) -> RunPublic:
    spec = RunCreate.model_validate(run.spec)
    last = crud.last_epoch_metric(session=session, run=run)
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
            "status": run.status,
            "spec": spec,
            "error": run.error,
            "cancel_requested": run.cancel_requested,
            "created_at": run.created_at,
            "started_at": run.started_at,
            "finished_at": run.finished_at,
            "summary": summary,
        }
    )


def require_dataset(spec: RunCreate, settings: Settings) -> None:
    """A missing dataset is the user's to fix: say so at submit time, not as a failed run later."""
    name = spec.dataset.name
    if name not in datasets.FILE_DATASETS:
        return
    search_dirs = [settings.data_dir, datasets.SYSTEM_DATASET_DIR]
    if datasets.find_dataset_dir(name, search_dirs) is None:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT, detail=datasets.missing_dataset_message(name, search_dirs)
        )


def require_capacity(*, session: Session, owner: str, limit: int) -> None:
    active = crud.count_active_runs(session=session, owner=owner)
    if active >= limit:
        raise HTTPException(
            status.HTTP_429_TOO_MANY_REQUESTS,
            detail=f"key '{owner}' already has {active} queued or running runs (limit {limit}); "
            "wait for some to finish or cancel them",
            headers={"Retry-After": "30"},
        )


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    summary="Submit a training run",
    responses={
        422: {"description": "Invalid spec or missing dataset"},
        429: {"model": Message},
        503: {"model": Message},
    },
)
def submit_run(
    spec: RunCreate, session: SessionDep, settings: SettingsDep, principal: PrincipalDep, response: Response
) -> RunPublic:
    require_dataset(spec, settings)
    require_capacity(session=session, owner=principal.name, limit=settings.max_active_runs_per_key)
    run = crud.create_run(session=session, spec=spec, owner=principal.name)
    # Commit, then enqueue: otherwise a worker could receive the id before the row exists.
    session.commit()
    location = f"/api/v1/runs/{run.id}"
    try:
        publish(run.id, spec)
    except BrokerUnavailable as exc:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            detail=f"the broker is unreachable ({exc}); run {run.id} is saved as queued and is published "
            "again once the broker is back",
            headers={"Location": location, "Retry-After": "10"},
        ) from exc
    crud.mark_enqueued(session=session, run_id=run.id)
    response.headers["Location"] = location
    return run_public(session=session, run=run)


@router.get("", summary="List runs, newest first")
def list_runs(
    session: SessionDep,
    status_filter: Annotated[
        RunStatus | None, Query(alias="status", description="Only runs in this state.")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
) -> RunsPublic:
    runs, total = crud.list_runs(session=session, status=status_filter, limit=limit, offset=offset)
    return RunsPublic(
        items=[run_public(session=session, run=run) for run in runs], total=total, limit=limit, offset=offset
    )


@router.get("/{run_id}", summary="One run: status, spec, timestamps, error and summary")
def get_run(run: RunDep, session: SessionDep) -> RunPublic:
    return run_public(session=session, run=run)


@router.get("/{run_id}/metrics", summary="Per-epoch metrics, written as each epoch ends")
def get_metrics(run: RunDep, session: SessionDep) -> RunMetricsPublic:
    rows = crud.list_epoch_metrics(session=session, run_id=run.id)
    return RunMetricsPublic(epochs=[EpochMetricPublic.model_validate(row) for row in rows])


@router.post(
    "/{run_id}/cancel",
    summary="Cancel a run: a queued run never starts, a running one stops at its next step",
    responses={409: {"model": Message}},
)
def cancel_run(run: RunDep, session: SessionDep) -> RunPublic:
    if RunStatus(run.status).is_finished:
        raise HTTPException(status.HTTP_409_CONFLICT, detail=f"run {run.id} has already ended ({run.status})")
    crud.request_cancel(session=session, run=run)
    session.flush()
    return run_public(session=session, run=run)


@router.post(
    "/{run_id}/predict",
    summary="Predict with the trained model in eval mode (BN running statistics)",
    responses={409: {"model": Message}, 422: {"model": Message}},
    openapi_extra=READ,
)
def predict(run: RunDep, body: PredictRequest, session: SessionDep) -> PredictResponse:
    if run.status != RunStatus.succeeded:
        raise HTTPException(
            status.HTTP_409_CONFLICT, detail=f"run {run.id} is {run.status}; only a succeeded run can predict"
        )
    loaded = inference.model_cache.get(session=session, run_id=run.id)
    if loaded is None:
        raise HTTPException(status.HTTP_409_CONFLICT, detail=f"run {run.id} has no stored model")
    model, config = loaded
    try:
        inputs = inference.inputs_to_tensor(body.inputs, config)
    except inference.InputError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=str(exc)) from exc
    predictions, probabilities = inference.predict(model, inputs)
    return PredictResponse(predictions=predictions, probabilities=probabilities)
