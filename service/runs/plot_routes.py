"""GET /api/v1/runs/{id}/plot.png|svg: one run's curves, or its layer input statistics.

metric=loss|accuracy: training (solid) and validation (dashed) curves over epochs.
metric=activations: per normalisation slot, the mean (top panel) and std (bottom panel) of the
slot's input on the run's probe batch, epoch 0 being the initial network. A run with nothing to
draw yet (no finished epoch, no probe statistics) answers 409 with what is missing.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Annotated, Literal

from fastapi import APIRouter, HTTPException, Query, Response, status
from sqlalchemy.orm import Session

from service.api.deps import RunDep, SessionDep
from service.api.images import IMAGE_RESPONSES, PlotFormat
from service.experiments import plots
from service.models import Run, RunStatus
from service.runs import repository as run_repo

if TYPE_CHECKING:
    from matplotlib.figure import Figure

router = APIRouter(prefix="/api/v1/runs", tags=["runs"])

RunPlotMetric = Annotated[
    Literal["loss", "accuracy", "activations"],
    Query(description="loss or accuracy curves, or activations: each slot's input mean and std per epoch."),
]


ENDED_AS = {"succeeded": "succeeded", "failed": "failed", "cancelled": "was cancelled"}


def _nothing_yet(run: Run, what: str, why: str = "") -> HTTPException:
    # "yet" only while the run may still write some: an ended run never will.
    if RunStatus(run.status).is_finished:
        error = f" ({run.error})" if run.error else ""
        detail = f"run {run.id} {ENDED_AS[run.status]}{error} before it finished an epoch: it has no {what}"
    else:
        detail = f"run {run.id} ({run.status}) has no {what} yet{why}"
    return HTTPException(status.HTTP_409_CONFLICT, detail=detail)


def _curves(session: Session, run: Run, metric: Literal["loss", "accuracy"]) -> Figure:
    rows = run_repo.list_epoch_metrics(session=session, run_id=run.id)
    if not rows:
        raise _nothing_yet(run, "finished epoch to plot")
    bands = {}
    for split in ("train", "val"):
        key = f"{split}_{metric}"
        band = plots.band([[getattr(row, key) for row in rows]])
        if band is not None:
            bands[key] = band
    what = "Loss" if metric == "loss" else "Accuracy"
    return plots.curves_figure(
        [(run.name or run.id, bands)], metric=metric, title=f"Training and Validation {what}"
    )


def _activations(session: Session, run: Run) -> Figure:
    rows = run_repo.list_layer_stats(session=session, run_id=run.id)
    if not rows:
        raise _nothing_yet(run, "layer statistics", " (they are written as each epoch ends)")
    layers: dict[str, list[tuple[int, float, float]]] = {}
    for row in rows:
        layers.setdefault(row.layer, []).append((row.epoch, row.input_mean, row.input_std))
    series = [
        (
            layer,
            plots.Band(
                epochs=[e for e, _, _ in points],
                mean=[m for _, m, _ in points],
                std=[s for _, _, s in points],
            ),
        )
        for layer, points in sorted(layers.items(), key=lambda item: _natural(item[0]))
    ]
    return plots.activations_figure(series, title=f"Layer inputs on the probe batch: {run.name or run.id}")


def _natural(name: str) -> tuple[str, int]:
    # bn2 before bn10: a slot name is a prefix and a block number.
    match = re.fullmatch(r"(.*?)(\d*)", name)
    stem, number = match.groups() if match else (name, "")
    return stem, int(number or 0)


@router.get(
    "/{run_id}/plot.{fmt}",
    summary="Plot a run: loss or accuracy curves, or each normalisation slot's input mean and std",
    response_class=Response,
    responses=IMAGE_RESPONSES,
)
def get_run_plot(
    run: RunDep, fmt: PlotFormat, session: SessionDep, metric: RunPlotMetric = "loss"
) -> Response:
    figure = _activations(session, run) if metric == "activations" else _curves(session, run, metric)
    return Response(plots.render(figure, fmt), media_type=plots.CONTENT_TYPES[fmt])
