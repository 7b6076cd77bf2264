"""/api/v1/experiments: grids of runs over one base spec, their report and their plots.

Submitting validates every run first (each grid point as a run spec, the run count, the key's cap
on active runs, the datasets), stores the experiment and all its runs in one transaction, commits,
then publishes each run by task name exactly as POST /api/v1/runs does.
"""

from __future__ import annotations

from collections import Counter
from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Query, Response, status

from service.api.csv import csv_response
from service.api.deps import ExperimentId, LimitQuery, OffsetQuery, SessionDep, SettingsDep
from service.api.errors import Message
from service.api.images import IMAGE_RESPONSES, PlotFormat
from service.api.security import PrincipalDep
from service.experiments import grid, plots, presets, report
from service.experiments import repository as experiment_repo
from service.experiments.grid import METRICS
from service.experiments.schemas import (
    ExperimentCreate,
    ExperimentPatch,
    ExperimentPublic,
    ExperimentReportPublic,
    ExperimentsPublic,
)
from service.experiments.service import create_experiment, experiment_or_404, experiment_public, results
from service.models import Experiment, RunStatus
from service.runs import repository as run_repo
from service.runs.schemas import EpochMetricPublic
from service.runs.service import refuse_if_aliased

router = APIRouter(prefix="/api/v1/experiments", tags=["experiments"])


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    summary="Submit an experiment: one run per grid point and seed",
    responses={
        422: {
            "description": "Invalid spec, a grid point that makes an invalid run, too many runs, or a "
            "missing dataset"
        },
        429: {"model": Message},
        503: {"model": Message},
    },
)
def submit_experiment(
    spec: ExperimentCreate,
    session: SessionDep,
    settings: SettingsDep,
    principal: PrincipalDep,
    response: Response,
) -> ExperimentPublic:
    return create_experiment(
        session=session, settings=settings, owner=principal.name, spec=spec, preset=None, response=response
    )


@router.get(
    "",
    summary="List experiments, newest first; search and sort them",
    description="`q`: a part of the name (any case) or a prefix of the id; `preset`: only experiments from "
    "this preset; `sort` by created_at (default, newest first) or name (A–Z); `order` reverses.",
)
def list_experiments(
    session: SessionDep,
    limit: LimitQuery = 20,
    offset: OffsetQuery = 0,
    q: Annotated[str | None, Query(min_length=1, max_length=200, description="Search text.")] = None,
    preset: Annotated[
        str | None, Query(pattern=r"^[a-z0-9-]{1,60}$", description="Only this preset's experiments.")
    ] = None,
    sort: Annotated[Literal["created_at", "name"], Query(description="Sort key.")] = "created_at",
    order: Annotated[Literal["asc", "desc"] | None, Query(description="Sort direction.")] = None,
) -> ExperimentsPublic:
    descending = order == "desc" if order else sort == "created_at"
    page, total = experiment_repo.list_experiments(
        session=session, limit=limit, offset=offset, search=q, preset=preset, sort=sort, descending=descending
    )
    return ExperimentsPublic(
        items=[experiment_public(session=session, experiment=e) for e in page],
        total=total,
        limit=limit,
        offset=offset,
    )


@router.get("/{experiment_id}", summary="One experiment: its grid, seeds and runs with their progress")
def get_experiment(experiment_id: ExperimentId, session: SessionDep) -> ExperimentPublic:
    return experiment_public(session=session, experiment=experiment_or_404(session, experiment_id))


@router.post("/{experiment_id}/cancel", summary="Cancel every run of the experiment that has not ended")
def cancel_experiment(experiment_id: ExperimentId, session: SessionDep) -> ExperimentPublic:
    experiment = experiment_or_404(session, experiment_id)
    for run in experiment_repo.list_experiment_runs(session=session, experiment_id=experiment.id):
        if not RunStatus(run.status).is_finished:
            run_repo.request_cancel(session=session, run=run)
    session.flush()
    return experiment_public(session=session, experiment=experiment)


@router.delete(
    "/{experiment_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Delete an experiment with its runs and all they stored; running ones stop at their next step",
    responses={409: {"model": Message, "description": "An alias serves the experiment or one of its runs"}},
)
def delete_experiment(experiment_id: ExperimentId, session: SessionDep) -> None:
    experiment = experiment_or_404(session, experiment_id)
    runs = experiment_repo.list_experiment_runs(session=session, experiment_id=experiment.id)
    refuse_if_aliased(session, f"experiment {experiment.id}", [run.id for run in runs], experiment.id)
    experiment_repo.delete_experiment(session=session, experiment=experiment)


@router.patch(
    "/{experiment_id}", summary="Rename an experiment, or set its tags or notes (fields left out stay)"
)
def patch_experiment(
    experiment_id: ExperimentId, changes: ExperimentPatch, session: SessionDep
) -> ExperimentPublic:
    experiment = experiment_or_404(session, experiment_id)
    run_repo.update_labels(target=experiment, changes=changes.model_dump(exclude_unset=True))
    session.flush()
    return experiment_public(session=session, experiment=experiment)


TargetQuery = Annotated[
    float | None,
    Query(gt=0, le=1, description="Validation accuracy for epochs-to-target; default: the experiment's."),
]


@router.get(
    "/{experiment_id}/report",
    response_model=ExperimentReportPublic,
    summary="Per configuration: final and best metrics (mean ± std over seeds), epochs to a target "
    "accuracy, the winners, and for presets each claim's verdict",
    responses={200: {"content": {"text/csv": {}}, "description": "JSON, or CSV with format=csv"}},
)
def get_report(
    experiment_id: ExperimentId,
    session: SessionDep,
    target: TargetQuery = None,
    fmt: Annotated[
        Literal["json", "csv"], Query(alias="format", description="json (default) or csv, as report.csv.")
    ] = "json",
) -> Any:
    experiment = experiment_or_404(session, experiment_id)
    spec = ExperimentCreate.model_validate(experiment.spec)
    answer = report.report(
        experiment_id=experiment.id,
        spec=spec,
        preset=experiment.preset,
        results=results(session, experiment),
        target=spec.target if target is None else target,
        claims=presets.claims_of(experiment.preset),
    )
    if fmt == "csv":
        return csv_response(report_rows(answer), columns=report_columns(), filename=f"{experiment.id}-report")
    return answer


@router.get(
    "/{experiment_id}/report.csv",
    summary="The report's configurations as CSV: one row per configuration, mean and std of each statistic",
    response_class=Response,
    responses={200: {"content": {"text/csv": {}}, "description": "config, counts, then <stat>_mean/_std"}},
)
def get_report_csv(experiment_id: ExperimentId, session: SessionDep, target: TargetQuery = None) -> Any:
    return get_report(experiment_id, session, target, fmt="csv")


@router.get(
    "/{experiment_id}/metrics.csv",
    summary="Every epoch of every run as CSV, with each run's configuration and seed",
    response_class=Response,
    responses={200: {"content": {"text/csv": {}}, "description": "run_id, config, seed, epoch, metrics"}},
)
def get_metrics_csv(experiment_id: ExperimentId, session: SessionDep) -> Response:
    experiment = experiment_or_404(session, experiment_id)
    runs = experiment_repo.list_experiment_runs(session=session, experiment_id=experiment.id)
    by_run = experiment_repo.metrics_by_run(session=session, experiment_id=experiment.id)
    rows = [
        {
            "run_id": run.id,
            "config": grid.config_label(run.grid_point or {}),
            "seed": run.spec["train"]["seed"],
            **EpochMetricPublic.model_validate(epoch).model_dump(),
        }
        for run in runs
        for epoch in by_run.get(run.id, [])
    ]
    columns = ["run_id", "config", "seed", *EpochMetricPublic.model_fields]
    return csv_response(rows, columns=columns, filename=f"{experiment.id}-metrics")


def report_columns() -> list[str]:
    stats = [
        f"{kind}_{metric}_{part}"
        for kind in ("final", "best")
        for metric in METRICS
        for part in ("mean", "std")
    ]
    return [
        "config",
        "runs",
        "succeeded",
        "unfinished",
        "failed",
        "diverged",  # of the failed: the runs whose loss became non-finite
        *stats,
        "epochs_to_target_mean",
        "reached",
    ]


def report_rows(answer: ExperimentReportPublic) -> list[dict[str, Any]]:
    rows = []
    for c in answer.configurations:
        row: dict[str, Any] = {
            "config": c.config,
            "runs": c.runs,
            "succeeded": c.succeeded,
            "unfinished": c.unfinished,
            "failed": c.failed,
            "diverged": c.diverged,
            "epochs_to_target_mean": c.epochs_to_target.mean,
            "reached": c.epochs_to_target.reached,
        }
        for kind, stats in (("final", c.final), ("best", c.best)):
            for metric, value in stats.items():
                row[f"{kind}_{metric}_mean"] = value.mean
                row[f"{kind}_{metric}_std"] = value.std
        rows.append(row)
    return rows


def _nothing_to_plot(experiment: Experiment, runs: list[report.RunResult]) -> HTTPException:
    # "yet" only while some run may still finish an epoch.
    if all(RunStatus(run.status).is_finished for run in runs):
        counts = ", ".join(f"{n} {s}" for s, n in sorted(Counter(run.status for run in runs).items()))
        detail = (
            f"every run of experiment {experiment.id} ended ({counts}) before finishing an epoch: "
            "nothing to plot"
        )
    else:
        detail = f"experiment {experiment.id} has no finished epoch to plot yet"
    return HTTPException(status.HTTP_409_CONFLICT, detail=detail)


PlotMetric = Annotated[
    Literal["loss", "accuracy"],
    Query(description="loss: training and validation loss; accuracy: training and validation accuracy."),
]


@router.get(
    "/{experiment_id}/plot.{fmt}",
    summary="Training and validation curves per configuration: the mean over seeds with a ±std band",
    response_class=Response,
    responses=IMAGE_RESPONSES,
)
def get_plot(
    experiment_id: ExperimentId, fmt: PlotFormat, session: SessionDep, metric: PlotMetric = "loss"
) -> Response:
    experiment = experiment_or_404(session, experiment_id)
    spec = ExperimentCreate.model_validate(experiment.spec)
    points = grid.grid_points(spec.grid)
    grouped = report.group_by_config(points, results(session, experiment))
    curves = []
    for point, runs in zip(points, grouped, strict=True):
        bands = {
            f"{split}_{metric}": plots.band(
                [[getattr(e, f"{split}_{metric}") for e in r.epochs] for r in runs]
            )
            for split in ("train", "val")
        }
        present = {k: b for k, b in bands.items() if b is not None}
        if present:
            curves.append((grid.config_label(point), present))
    if not curves:
        raise _nothing_to_plot(experiment, [run for runs in grouped for run in runs])
    what = "Loss" if metric == "loss" else "Accuracy"
    title = f"Training and Validation {what}: {spec.name}"
    image = plots.render(plots.curves_figure(curves, metric=metric, title=title), fmt)
    return Response(image, media_type=plots.CONTENT_TYPES[fmt])
