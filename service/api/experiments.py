"""/api/v1/experiments: grids of runs over one base spec, their report and their plots.

Submitting validates every run first (each grid point as a run spec, the run count, the key's cap
on active runs, the datasets), stores the experiment and all its runs in one transaction, commits,
then publishes each run by task name exactly as POST /api/v1/runs does.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Path, Query, Response, status
from sqlalchemy.orm import Session

from service import crud, crud_experiments, experiments, plots, presets
from service.api.deps import ExperimentIdPath, LimitQuery, OffsetQuery, SessionDep, SettingsDep
from service.api.runs import publish_runs, require_capacity, require_dataset
from service.api.security import PrincipalDep
from service.config import Settings
from service.models import EpochMetric, Experiment, Run, RunStatus
from service.queue import BrokerUnavailable
from service.schemas import (
    ExperimentCreate,
    ExperimentPublic,
    ExperimentReportPublic,
    ExperimentRunPublic,
    ExperimentsPublic,
    Message,
    RunCreate,
)

router = APIRouter(prefix="/api/v1/experiments", tags=["experiments"])

IMAGE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"image/png": {}, "image/svg+xml": {}}, "description": "The plot"},
    409: {"model": Message, "description": "Nothing to draw yet (no finished epoch)"},
}


def experiment_or_404(session: Session, experiment_id: str) -> Experiment:
    experiment = crud_experiments.get_experiment(session=session, experiment_id=experiment_id)
    if experiment is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"experiment {experiment_id} not found")
    return experiment


def experiment_public(*, session: Session, experiment: Experiment) -> ExperimentPublic:
    runs = crud_experiments.list_experiment_runs(session=session, experiment_id=experiment.id)
    last = crud_experiments.last_metrics(session=session, experiment_id=experiment.id)
    counts = {s.value: 0 for s in RunStatus}
    for run in runs:
        counts[run.status] += 1
    return ExperimentPublic.model_validate(
        {
            "id": experiment.id,
            "name": experiment.name,
            "preset": experiment.preset,
            "spec": experiment.spec,
            "status_counts": counts,
            "finished": all(RunStatus(r.status).is_finished for r in runs),
            "created_at": experiment.created_at,
            "runs": [_run_public(run, last.get(run.id)) for run in runs],
        }
    )


def _run_public(run: Run, last: EpochMetric | None) -> ExperimentRunPublic:
    point = run.grid_point or {}
    return ExperimentRunPublic(
        id=run.id,
        name=run.name,
        status=run.status,
        grid_point=point,
        config=experiments.config_label(point),
        seed=int(run.spec["train"]["seed"]),
        epochs_done=run.epochs_done,
        epochs_total=int(run.spec["train"]["epochs"]),
        val_loss=last.val_loss if last else None,
        val_accuracy=last.val_accuracy if last else None,
    )


def create_experiment(
    *,
    session: Session,
    settings: Settings,
    owner: str,
    spec: ExperimentCreate,
    preset: str | None,
    response: Response,
) -> ExperimentPublic:
    """Validate, store all runs in one transaction, commit, then publish each (shared with presets)."""
    try:
        planned = experiments.expand(spec)
    except experiments.GridError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=str(exc)) from exc
    for name in {p.spec.dataset.name for p in planned}:
        require_dataset(
            next(p.spec for p in planned if p.spec.dataset.name == name), settings, session=session
        )
    require_capacity(
        session=session, owner=owner, limit=settings.max_active_runs_per_key, adding=len(planned)
    )
    experiment = crud_experiments.create_experiment(
        session=session, name=spec.name, spec=spec.model_dump(mode="json"), preset=preset, owner=owner
    )
    runs = [
        crud_experiments.add_run(
            session=session, experiment_id=experiment.id, spec=p.spec, grid_point=p.point, owner=owner
        )
        for p in planned
    ]
    answer = experiment_public(session=session, experiment=experiment)
    # Commit, then publish outside any transaction: a worker must never get an id before its row
    # exists, and ten publishes must not hold the database while the broker answers.
    session.commit()
    location = f"/api/v1/experiments/{experiment.id}"
    _publish_all(session, [(run.id, p.spec) for run, p in zip(runs, planned, strict=True)], location)
    response.headers["Location"] = location
    return answer


def _publish_all(session: Session, runs: list[tuple[str, RunCreate]], location: str) -> None:
    try:
        publish_runs(session=session, runs=runs)
    except BrokerUnavailable as exc:
        # Those published are on record; the rest stay queued and the reaper publishes them.
        # No further tries: each would wait out the broker timeout again.
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            detail=f"the broker is unreachable ({exc}); the experiment and its {len(runs)} runs are "
            "saved as queued and those not yet published are published again once the broker is back",
            headers={"Location": location, "Retry-After": "10"},
        ) from exc


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


@router.get("", summary="List experiments, newest first")
def list_experiments(
    session: SessionDep,
    limit: LimitQuery = 20,
    offset: OffsetQuery = 0,
) -> ExperimentsPublic:
    page, total = crud_experiments.list_experiments(session=session, limit=limit, offset=offset)
    return ExperimentsPublic(
        items=[experiment_public(session=session, experiment=e) for e in page],
        total=total,
        limit=limit,
        offset=offset,
    )


@router.get("/{experiment_id}", summary="One experiment: its grid, seeds and runs with their progress")
def get_experiment(experiment_id: ExperimentIdPath, session: SessionDep) -> ExperimentPublic:
    return experiment_public(session=session, experiment=experiment_or_404(session, experiment_id))


@router.post("/{experiment_id}/cancel", summary="Cancel every run of the experiment that has not ended")
def cancel_experiment(experiment_id: ExperimentIdPath, session: SessionDep) -> ExperimentPublic:
    experiment = experiment_or_404(session, experiment_id)
    for run in crud_experiments.list_experiment_runs(session=session, experiment_id=experiment.id):
        if not RunStatus(run.status).is_finished:
            crud.request_cancel(session=session, run=run)
    session.flush()
    return experiment_public(session=session, experiment=experiment)


def results(session: Session, experiment: Experiment) -> list[experiments.RunResult]:
    metrics = crud_experiments.metrics_by_run(session=session, experiment_id=experiment.id)
    return [
        experiments.RunResult(
            point=run.grid_point or {},
            seed=int(run.spec["train"]["seed"]),
            status=run.status,
            epochs=[
                experiments.EpochRow(
                    epoch=m.epoch,
                    val_accuracy=m.val_accuracy,
                    val_loss=m.val_loss,
                    train_accuracy=m.train_accuracy,
                    train_loss=m.train_loss,
                )
                for m in metrics.get(run.id, [])
            ],
        )
        for run in crud_experiments.list_experiment_runs(session=session, experiment_id=experiment.id)
    ]


@router.get(
    "/{experiment_id}/report",
    summary="Per configuration: final and best metrics (mean ± std over seeds), epochs to a target "
    "accuracy, the winners, and for presets each claim's verdict",
)
def get_report(
    experiment_id: ExperimentIdPath,
    session: SessionDep,
    target: Annotated[
        float | None,
        Query(gt=0, le=1, description="Validation accuracy for epochs-to-target; default: the experiment's."),
    ] = None,
) -> ExperimentReportPublic:
    experiment = experiment_or_404(session, experiment_id)
    spec = ExperimentCreate.model_validate(experiment.spec)
    return experiments.report(
        experiment_id=experiment.id,
        spec=spec,
        preset=experiment.preset,
        results=results(session, experiment),
        target=spec.target if target is None else target,
        claims=presets.claims_of(experiment.preset),
    )


PlotMetric = Annotated[
    Literal["loss", "accuracy"],
    Query(description="loss: training and validation loss; accuracy: training and validation accuracy."),
]
PlotFormat = Annotated[Literal["png", "svg"], Path(description="png or svg.")]


@router.get(
    "/{experiment_id}/plot.{fmt}",
    summary="Training and validation curves per configuration: the mean over seeds with a ±std band",
    response_class=Response,
    responses=IMAGE_RESPONSES,
)
def get_plot(
    experiment_id: ExperimentIdPath, fmt: PlotFormat, session: SessionDep, metric: PlotMetric = "loss"
) -> Response:
    experiment = experiment_or_404(session, experiment_id)
    spec = ExperimentCreate.model_validate(experiment.spec)
    points = experiments.grid_points(spec.grid)
    grouped = experiments.group_by_config(points, results(session, experiment))
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
            curves.append((experiments.config_label(point), present))
    if not curves:
        raise HTTPException(
            status.HTTP_409_CONFLICT, detail=f"experiment {experiment.id} has no finished epoch to plot yet"
        )
    what = "Loss" if metric == "loss" else "Accuracy"
    title = f"Training and Validation {what}: {spec.name}"
    image = plots.render(plots.curves_figure(curves, metric=metric, title=title), fmt)
    return Response(image, media_type=plots.CONTENT_TYPES[fmt])
