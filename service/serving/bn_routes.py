"""BN tools on a trained run: its BN layers' statistics, and PreciseBN recalibration."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Response, status

from service.api.deps import RunId
from service.api.errors import Message
from service.ml import bn_tools
from service.ml.datasets import DatasetError
from service.serving import recalibration
from service.serving.schemas import BNLayerPublic, BNStatsPublic, RecalibrateRequest, RecalibrationPublic
from service.serving.served import require_succeeded_run, served_model, served_run_model

router = APIRouter(prefix="/api/v1/runs", tags=["bn tools"])


@router.get(
    "/{run_id}/bn-stats",
    summary="Per BN layer: running mean/variance summaries and histograms, "
    "num_batches_tracked, momentum, eps",
    responses={404: {"model": Message}, 409: {"model": Message}},
)
def get_bn_stats(
    run_id: RunId,
    version: Annotated[int | None, Query(ge=1, le=1_000_000, description="Default: the newest.")] = None,
    bins: Annotated[int, Query(ge=1, le=200, description="Histogram bins.")] = 20,
) -> BNStatsPublic:
    loaded = served_run_model(run_id, version)
    layers = [
        BNLayerPublic.model_validate(asdict(layer)) for layer in bn_tools.bn_stats(loaded.unfused, bins)
    ]
    return BNStatsPublic(run_id=run_id, version=loaded.version, layers=layers)


@router.post(
    "/{run_id}/recalibrate",
    status_code=status.HTTP_201_CREATED,
    summary="PreciseBN: recompute BN statistics over training batches with frozen weights, as a new version",
    description="Runs in the API process and answers when done (about a second for Fashion-MNIST's "
    "training split); one at a time per process, 503 with Retry-After meanwhile.",
    responses={
        400: {"model": Message, "description": "The body is not JSON"},
        404: {"model": Message},
        409: {"model": Message},
        422: {"model": Message},
        503: {"model": Message},
    },
)
def recalibrate(run_id: RunId, body: RecalibrateRequest, response: Response) -> RecalibrationPublic:
    require_succeeded_run(run_id)
    _, loaded = served_model(run_id, body.base_version)
    try:
        row = recalibration.recalibrate_run(run_id=run_id, loaded=loaded, request=body)
    except recalibration.RecalibrationBusy as exc:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE, detail=str(exc), headers={"Retry-After": "2"}
        ) from exc
    except (recalibration.NothingToRecalibrate, recalibration.TooFewSamples, DatasetError) as exc:
        # The request is well-formed; the run's model or data cannot meet it.
        raise HTTPException(status.HTTP_409_CONFLICT, detail=str(exc)) from exc
    response.headers["Location"] = f"/api/v1/runs/{run_id}/versions/{row.version}"
    return RecalibrationPublic.model_validate(row)
