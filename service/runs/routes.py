"""/api/v1/runs: submit training jobs, follow them, cancel them, and query the trained models."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import torch
from fastapi import APIRouter, HTTPException, Query, Request, Response, status
from starlette.concurrency import run_in_threadpool

from service.api.bodies import IMAGE_UPLOAD_SCHEMA, body_docs, inline_schema, json_response
from service.api.csv import csv_response
from service.api.deps import (
    LimitQuery,
    OffsetQuery,
    RunDep,
    RunId,
    SessionDep,
    SettingsDep,
    experiment_id_for,
)
from service.api.errors import Message
from service.api.security import READ, PrincipalDep
from service.ml import bn_tools
from service.ml.config import NormKind, ProbeName
from service.ml.probes import MODEL, PROBE_SAMPLES
from service.models import RunStatus
from service.queue import BrokerUnavailable
from service.runs import repository as run_repo
from service.runs.schemas import (
    DatasetName,
    EpochMetricPublic,
    EpochSlotStatisticsPublic,
    ProbeEpochPublic,
    ProbeLayerPublic,
    RunCreate,
    RunLayerStatsPublic,
    RunMetricsPublic,
    RunPatch,
    RunProbePublic,
    RunPublic,
    RunsPublic,
    SlotStatisticPublic,
)
from service.runs.service import (
    publish_runs,
    refuse_if_aliased,
    require_capacity,
    require_dataset,
    run_public,
    runs_public,
)
from service.serving import served
from service.serving.images import Invert
from service.serving.inputs import PredictBody, read_predict_body
from service.serving.schemas import PredictRequest, ServedPredictResponse
from service.serving.server import LoadedModel

router = APIRouter(prefix="/api/v1/runs", tags=["runs"])


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
    run = run_repo.create_run(session=session, spec=spec, owner=principal.name)
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


RunSortKey = Literal[
    "created_at", "name", "status", "epochs_done", "train_loss", "train_accuracy", "val_loss", "val_accuracy"
]
SearchText = Annotated[str, Query(min_length=1, max_length=200)]


@router.get(
    "",
    summary="List runs, newest first; filter, search and sort them",
    description="Every filter is optional and they combine (AND). `sort` by a run column or by a metric of "
    "the last finished epoch (runs without one come last); `order` defaults to desc for created_at and "
    "the accuracies, asc otherwise. An unknown sort key or filter value is a 422 naming the allowed ones.",
)
def list_runs(
    session: SessionDep,
    status_filter: Annotated[
        RunStatus | None, Query(alias="status", description="Only runs in this state.")
    ] = None,
    limit: LimitQuery = 20,
    offset: OffsetQuery = 0,
    experiment_id: Annotated[
        str | None,
        Query(
            pattern=r"^[0-9a-f]{6,32}$", description="Only the runs of this experiment (id or unique prefix)."
        ),
    ] = None,
    in_experiment: Annotated[
        bool | None,
        Query(description="false: only runs submitted on their own; true: only experiments' runs."),
    ] = None,
    q: Annotated[
        SearchText | None, Query(description="Search: a part of the name (any case) or a prefix of the id.")
    ] = None,
    name: Annotated[SearchText | None, Query(description="Only names containing this, any case.")] = None,
    norm: Annotated[NormKind | None, Query(description="Only runs with this model.norm.kind.")] = None,
    dataset: Annotated[DatasetName | None, Query(description="Only runs on this dataset.name.")] = None,
    tag: Annotated[
        str | None,
        Query(pattern=r"^[A-Za-z0-9_.:+=@#-]{1,40}$", description="Only runs with this tag (ASCII)."),
    ] = None,
    sort: Annotated[RunSortKey, Query(description="Sort key.")] = "created_at",
    order: Annotated[Literal["asc", "desc"] | None, Query(description="Sort direction.")] = None,
) -> RunsPublic:
    where = run_repo.RunFilter(
        status=status_filter,
        experiment_id=experiment_id_for(experiment_id) if experiment_id else None,
        in_experiment=in_experiment,
        name=name,
        search=q,
        norm=norm,
        dataset=dataset,
        tag=tag,
    )
    descending = order == "desc" if order else sort in ("created_at", "train_accuracy", "val_accuracy")
    runs, total = run_repo.list_runs(
        session=session, limit=limit, offset=offset, where=where, sort=sort, descending=descending
    )
    return RunsPublic(items=runs_public(session=session, runs=runs), total=total, limit=limit, offset=offset)


@router.get("/{run_id}", summary="One run: status, spec, timestamps, error and summary")
def get_run(run: RunDep, session: SessionDep) -> RunPublic:
    return run_public(session=session, run=run)


MetricsFormat = Annotated[
    Literal["json", "csv"], Query(alias="format", description="json (default) or csv, as metrics.csv.")
]


@router.get(
    "/{run_id}/metrics",
    summary="Per-epoch metrics, written as each epoch ends",
    response_model=RunMetricsPublic,
    responses={200: {"content": {"text/csv": {}}, "description": "JSON, or CSV with format=csv"}},
)
def get_metrics(run: RunDep, session: SessionDep, fmt: MetricsFormat = "json") -> Any:
    if fmt == "csv":
        return get_metrics_csv(run, session)
    rows = run_repo.list_epoch_metrics(session=session, run_id=run.id)
    return RunMetricsPublic(epochs=[EpochMetricPublic.model_validate(row) for row in rows])


@router.get(
    "/{run_id}/metrics.csv",
    summary="Per-epoch metrics as CSV: one row per epoch, a header row first",
    response_class=Response,
    responses={200: {"content": {"text/csv": {}}, "description": "run_id, epoch and the metric columns"}},
)
def get_metrics_csv(run: RunDep, session: SessionDep) -> Response:
    rows = run_repo.list_epoch_metrics(session=session, run_id=run.id)
    table = [{"run_id": run.id, **EpochMetricPublic.model_validate(row).model_dump()} for row in rows]
    return csv_response(
        table, columns=["run_id", *EpochMetricPublic.model_fields], filename=f"{run.id}-metrics"
    )


@router.get(
    "/{run_id}/layer-stats",
    summary="Internal covariate shift: mean and std of each normalisation slot's input, per epoch",
)
def get_layer_stats(run: RunDep, session: SessionDep) -> RunLayerStatsPublic:
    by_epoch: dict[int, list[SlotStatisticPublic]] = {}
    for row in run_repo.list_layer_stats(session=session, run_id=run.id):
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


@router.get(
    "/{run_id}/probes/{probe}",
    summary="An epoch-end probe (gradients, smoothness, percentiles, gamma, statistics_gap), per epoch",
    responses={200: {"content": {"text/csv": {}}, "description": "JSON, or CSV with format=csv"}},
)
def get_probe(
    run: RunDep,
    probe: ProbeName,
    session: SessionDep,
    format: Annotated[  # noqa: A002  # the query parameter's public name
        Literal["json", "csv"],
        Query(description="json (by epoch and layer) or csv (epoch,layer,name,value)."),
    ] = "json",
) -> Response:
    rows = run_repo.list_probe_values(session=session, run_id=run.id, probe=probe)
    if format == "csv":
        lines = ["epoch,layer,name,value"]
        lines += [f"{r.epoch},{r.layer},{r.name},{'' if r.value is None else repr(r.value)}" for r in rows]
        return Response("\n".join(lines) + "\n", media_type="text/csv")
    by_epoch: dict[int, dict[str, dict[str, float | None]]] = {}
    for row in rows:
        by_epoch.setdefault(row.epoch, {}).setdefault(row.layer, {})[row.name] = row.value
    body = RunProbePublic(
        probe=probe,
        probe_samples=PROBE_SAMPLES,
        epochs=[
            ProbeEpochPublic(
                epoch=epoch,
                layers=[
                    ProbeLayerPublic(layer=layer, values=values)
                    for layer, values in sorted(layers.items(), key=lambda item: layer_order(*item))
                ],
            )
            for epoch, layers in sorted(by_epoch.items())
        ],
    )
    return Response(body.model_dump_json(), media_type="application/json")


def layer_order(name: str, values: dict[str, float | None]) -> tuple[int, float, tuple[tuple[str, int], ...]]:
    """Layers in network order: by their recorded depth (the gradient probe's), else by module name,
    each dotted part naturally (bn2 before bn10, blocks.2 before blocks.10); "model" last."""
    if name == MODEL:
        return (2, 0.0, ())
    depth = values.get("depth")
    return (0 if depth is not None else 1, depth or 0.0, tuple(_natural(part) for part in name.split(".")))


@router.post(
    "/{run_id}/cancel",
    summary="Cancel a run: a queued run never starts, a running one stops at its next step",
    responses={409: {"model": Message}},
)
def cancel_run(run: RunDep, session: SessionDep) -> RunPublic:
    if RunStatus(run.status).is_finished:
        raise HTTPException(status.HTTP_409_CONFLICT, detail=f"run {run.id} has already ended ({run.status})")
    run_repo.request_cancel(session=session, run=run)
    session.flush()
    return run_public(session=session, run=run)


@router.delete(
    "/{run_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Delete a run with its metrics, checkpoints and models; a running one stops at its next step",
    responses={409: {"model": Message, "description": "An alias serves the run"}},
)
def delete_run(run: RunDep, session: SessionDep) -> None:
    refuse_if_aliased(session, f"run {run.id}", [run.id])
    # No cancel flag to set: the worker checks, between steps, that it still holds the run (the same
    # read that sees a cancel); a deleted run is held by no one, so it stops there and writes nothing.
    run_repo.delete_runs(session=session, run_ids=[run.id])


@router.patch("/{run_id}", summary="Rename a run, or set its tags or notes (fields left out stay)")
def patch_run(run: RunDep, changes: RunPatch, session: SessionDep) -> RunPublic:
    run_repo.update_labels(target=run, changes=changes.model_dump(exclude_unset=True))
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
    "An image is converted as docs/serving.md describes (grayscale, light-on-dark, letterboxed to 28×28).",
    responses={
        409: {"model": Message},
        413: {"model": Message},
        415: {"model": Message},
        422: {"model": Message},
    },
    openapi_extra=PREDICT_DOCS,
    response_model=ServedPredictResponse,
)
async def predict(
    request: Request,
    run_id: RunId,
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
) -> Response:
    body = await read_predict_body(request, invert=invert)
    if mode == "train":
        tensor, loaded = await run_in_threadpool(_predict_batch_stats, run_id, version, body)
        probabilities, predictions = tensor.tolist(), tensor.argmax(dim=1).tolist()
        served_fused = False
    else:
        answer = await served.infer(
            run_id, version, fused=fused, prepare=body, body_bytes=body.json_bytes, is_run_id=True
        )
        probabilities, predictions = answer.rows, answer.predictions
        loaded, served_fused = answer.loaded, answer.fused
    names = await served.class_names_of(run_id)
    return json_response(  # ServedPredictResponse, serialized without a second validation
        {
            "predictions": predictions,
            "probabilities": probabilities,
            "model_version": loaded.version,
            "fused": served_fused,
            "mode": mode,
            "image": body.image_info.model_dump() if body.image_info else None,
            "labels": [names[c] for c in predictions] if names else None,
            "class_names": names,
        }
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
