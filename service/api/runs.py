"""/api/v1/runs: submit training jobs, follow them, cancel them, and query the trained models."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Annotated, Literal

import torch
from fastapi import APIRouter, HTTPException, Query, Request, Response, status
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from service import crud, data
from service.api import served
from service.api.bodies import IMAGE_UPLOAD_SCHEMA, body_docs, inline_schema
from service.api.busy import is_busy
from service.api.deps import LimitQuery, OffsetQuery, RunDep, RunIdPath, SessionDep, SettingsDep
from service.api.predict_inputs import PredictBody, read_predict_body
from service.api.security import READ, PrincipalDep
from service.config import Settings
from service.images import Invert
from service.ml import bn_tools
from service.ml.probes import PROBE_SAMPLES
from service.models import Run, RunStatus
from service.queue import BrokerUnavailable
from service.runner import publish
from service.schemas import (
    MAX_PARAMETERS,
    EpochMetricPublic,
    EpochSlotStatisticsPublic,
    Message,
    PredictRequest,
    RunCreate,
    RunLayerStatsPublic,
    RunMetricsPublic,
    RunPublic,
    RunsPublic,
    RunSummary,
    ServedPredictResponse,
    SlotStatisticPublic,
)
from service.serving import LoadedModel

router = APIRouter(prefix="/api/v1/runs", tags=["runs"])
log = logging.getLogger(__name__)


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


def require_dataset(spec: RunCreate, settings: Settings, *, session: Session) -> None:
    """A missing dataset, or one the model cannot train on, is the user's to fix: say so at submit
    time (422), not as a failed run later. Reads through the request's session before it writes
    anything, and ends that read before counting parameters (CPU work no transaction should span:
    on SQLite every transaction holds the write lock)."""
    missing = data.missing_dataset(spec, settings)
    if missing is not None:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=missing)
    try:
        shape = data.data_shape(session=session, dataset=spec.dataset)
    except data.UnknownDataset as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=str(exc)) from exc
    session.commit()  # nothing is written yet: this only ends the read
    problem = data.shape_problem(spec, shape, max_parameters=MAX_PARAMETERS)
    if problem is not None:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=problem)


def require_capacity(*, session: Session, owner: str, limit: int, adding: int = 1) -> None:
    """429 unless `adding` more active runs (a whole experiment's) stay within the key's cap."""
    active = crud.count_active_runs(session=session, owner=owner)
    if active + adding > limit:
        adds = f"; this request would add {adding}" if adding > 1 else ""
        raise HTTPException(
            status.HTTP_429_TOO_MANY_REQUESTS,
            detail=f"key '{owner}' already has {active} queued or running runs (limit {limit}){adds}; "
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
    require_dataset(spec, settings, session=session)
    # One short write transaction (the cap, the row, the answer), committed before publishing: a
    # worker must never get a message before its row exists, and publishing, which waits for the
    # broker, must not hold the database.
    require_capacity(session=session, owner=principal.name, limit=settings.max_active_runs_per_key)
    run = crud.create_run(session=session, spec=spec, owner=principal.name)
    answer = run_public(session=session, run=run)
    session.commit()
    location = f"/api/v1/runs/{run.id}"
    try:
        publish_runs(session=session, runs=[(run.id, spec)])
    except BrokerUnavailable as exc:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            detail=f"the broker is unreachable ({exc}); run {run.id} is saved as queued and is published "
            "again once the broker is back",
            headers={"Location": location, "Retry-After": "10"},
        ) from exc
    response.headers["Location"] = location
    return answer


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
            crud.mark_enqueued(session=session, run_id=run_id)
        session.commit()
    except SQLAlchemyError as exc:
        if not is_busy(exc):
            raise
        session.rollback()
        log.warning("database busy: %d published runs not marked enqueued (%s)", len(run_ids), exc)


@router.get("", summary="List runs, newest first")
def list_runs(
    session: SessionDep,
    status_filter: Annotated[
        RunStatus | None, Query(alias="status", description="Only runs in this state.")
    ] = None,
    limit: LimitQuery = 20,
    offset: OffsetQuery = 0,
    experiment_id: Annotated[
        str | None, Query(pattern=r"^[0-9a-f]{32}$", description="Only the runs of this experiment.")
    ] = None,
) -> RunsPublic:
    runs, total = crud.list_runs(
        session=session, status=status_filter, limit=limit, offset=offset, experiment_id=experiment_id
    )
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


@router.get(
    "/{run_id}/layer-stats",
    summary="Internal covariate shift: mean and std of each normalisation slot's input, per epoch",
)
def get_layer_stats(run: RunDep, session: SessionDep) -> RunLayerStatsPublic:
    by_epoch: dict[int, list[SlotStatisticPublic]] = {}
    for row in crud.list_layer_stats(session=session, run_id=run.id):
        by_epoch.setdefault(row.epoch, []).append(
            SlotStatisticPublic(layer=row.layer, input_mean=row.input_mean, input_std=row.input_std)
        )
    return RunLayerStatsPublic(
        probe_samples=PROBE_SAMPLES,
        epochs=[
            EpochSlotStatisticsPublic(epoch=epoch, layers=sorted(layers, key=lambda s: _natural(s.layer)))
            for epoch, layers in sorted(by_epoch.items())
        ],
    )


def _natural(name: str) -> tuple[str, int]:
    # bn2 before bn10: slot names are a prefix and the block number.
    stem = name.rstrip("0123456789")
    return stem, int(name[len(stem) :] or 0)


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


PREDICT_DOCS = READ | body_docs(
    {"application/json": inline_schema(PredictRequest), "multipart/form-data": IMAGE_UPLOAD_SCHEMA}
)


@router.post(
    "/{run_id}/predict",
    summary="Predict with the trained model: JSON inputs, or an uploaded PNG/JPEG image",
    description="Eval mode (BN running statistics), BN folded into the Linear layers unless `fused=false`; "
    "`mode=train` answers with this request's batch statistics instead, stored buffers untouched. "
    "An image is converted by the rule in the README (grayscale, light-on-dark, letterboxed to 28×28).",
    responses={
        409: {"model": Message},
        413: {"model": Message},
        415: {"model": Message},
        422: {"model": Message},
    },
    openapi_extra=PREDICT_DOCS,
)
async def predict(
    request: Request,
    run_id: RunIdPath,
    fused: Annotated[bool, Query(description="Serve with BN folded into the Linear layers.")] = True,
    mode: Annotated[
        Literal["eval", "train"],
        Query(description="eval: running statistics; train: this batch's statistics."),
    ] = "eval",
    version: Annotated[
        int | None, Query(ge=1, le=1_000_000, description="Model version; default newest.")
    ] = None,
    invert: Annotated[
        Invert,
        Query(description="Images: auto inverts dark-on-light images (light border) to light-on-dark."),
    ] = "auto",
) -> ServedPredictResponse:
    body = await read_predict_body(request, invert=invert)
    if mode == "train":
        probabilities, loaded = await run_in_threadpool(_predict_batch_stats, run_id, version, body)
        served_fused = False
    else:
        answer = await served.infer(run_id, version, fused=fused, prepare=body, is_run_id=True)
        probabilities, loaded, served_fused = answer.probabilities, answer.loaded, answer.fused
    return ServedPredictResponse(
        predictions=probabilities.argmax(dim=1).tolist(),
        probabilities=probabilities.tolist(),
        model_version=loaded.version,
        fused=served_fused,
        mode=mode,
        image=body.image_info,
    )


def _predict_batch_stats(
    run_id: str, version: int | None, body: PredictBody
) -> tuple[torch.Tensor, LoadedModel]:
    """mode=train: this request's batch statistics. Never batched with other requests (their samples
    would change this one's statistics), on a copy of the model (the stored buffers never move)."""
    loaded = served.served_run_model(run_id, version)
    try:
        return bn_tools.predict_proba_batch_stats(loaded.unfused, body(loaded)), loaded
    except ValueError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=str(exc)) from exc
