"""GET /api/v1/runs/{id}/plot.png|svg: one run's curves, or its layer input statistics.

metric=loss|accuracy: training (solid) and validation (dashed) curves over epochs.
metric=activations: per normalisation slot, the mean (top panel) and std (bottom panel) of the
slot's input on the run's probe batch, epoch 0 being the initial network.
metric=gradients|smoothness|percentiles|gamma|statistics_gap: that probe's values (service/runs/
probe_plots.py, docs/probes.md). A run with nothing to draw yet (no finished epoch, no probe
statistics, a probe switched off) answers 409 with what is missing.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Annotated, Literal

from fastapi import APIRouter, HTTPException, Query, Response, status
from sqlalchemy.orm import Session

from service.api.deps import RunDep, SessionDep
from service.api.images import IMAGE_RESPONSES, PlotFormat
from service.experiments import plots
from service.models import Run, RunStatus
from service.runs import probe_plots
from service.runs import repository as run_repo
from service.runs.routes import layer_order

if TYPE_CHECKING:
    from matplotlib.figure import Figure

router = APIRouter(prefix="/api/v1/runs", tags=["runs"])

RunPlotMetric = Annotated[
    Literal[
        "loss", "accuracy", "activations", "gradients", "smoothness", "percentiles", "gamma", "statistics_gap"
    ],
    Query(
        description="loss or accuracy curves; activations: each slot's input mean and std per epoch; or "
        "one of the probes (gradients, smoothness, percentiles, gamma, statistics_gap: docs/probes.md)."
    ),
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
        # Null (not finite: the run diverged) is drawn as a gap.
        mean, std = (math.nan if v is None else v for v in (row.input_mean, row.input_std))
        layers.setdefault(row.layer, []).append((row.epoch, mean, std))
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


def _probe(session: Session, run: Run, probe: str) -> Figure:
    rows = run_repo.list_probe_values(session=session, run_id=run.id, probe=probe)
    if not rows:
        if RunStatus(run.status).is_finished:
            raise HTTPException(
                status.HTTP_409_CONFLICT,
                detail=f"run {run.id} ({run.status}) recorded no {probe} probe values: train.probes.{probe} "
                "was off, or it ended before its first epoch",
            )
        why = f" (is train.probes.{probe} on? they are written as each epoch ends)"
        raise _nothing_yet(run, f"{probe} probe values", why)
    data: probe_plots.ProbeData = {}
    for row in rows:
        data.setdefault(row.epoch, {}).setdefault(row.layer, {})[row.name] = row.value
    ordered = {
        epoch: dict(sorted(layers.items(), key=lambda item: layer_order(*item)))
        for epoch, layers in data.items()
    }
    return probe_plots.FIGURES[probe](ordered, title=f"{probe.replace('_', ' ')}: {run.name or run.id}")


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
    if metric == "loss" or metric == "accuracy":
        figure = _curves(session, run, metric)
    elif metric == "activations":
        figure = _activations(session, run)
    else:
        figure = _probe(session, run, metric)
    return Response(plots.render(figure, fmt), media_type=plots.CONTENT_TYPES[fmt])
