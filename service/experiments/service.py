"""The experiments domain's logic: submitting a grid (validate every run, store all in one
transaction, commit, then publish each run by task name exactly as POST /api/v1/runs does), an
experiment's public view, and its runs' results for the report."""

from __future__ import annotations

from collections.abc import Mapping

from fastapi import HTTPException, Response, status
from sqlalchemy.orm import Session

from service.config import Settings
from service.experiments import cost, grid, report
from service.experiments import repository as experiment_repo
from service.experiments.schemas import ExperimentCreate, ExperimentPublic, ExperimentRunPublic
from service.ml.datasets import DataShape
from service.models import EpochMetric, Experiment, Run, RunStatus
from service.queue import BrokerUnavailable
from service.runs import repository as run_repo
from service.runs.schemas import RunCreate
from service.runs.service import publish_runs, require_capacity, require_dataset


def experiment_or_404(session: Session, experiment_id: str) -> Experiment:
    experiment = experiment_repo.get_experiment(session=session, experiment_id=experiment_id)
    if experiment is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"experiment {experiment_id} not found")
    return experiment


def experiment_public(*, session: Session, experiment: Experiment) -> ExperimentPublic:
    runs = experiment_repo.list_experiment_runs(session=session, experiment_id=experiment.id)
    last = run_repo.last_epoch_metrics(session=session, runs=runs)
    counts = {s.value: 0 for s in RunStatus}
    for run in runs:
        counts[run.status] += 1
    return ExperimentPublic.model_validate(
        {
            "id": experiment.id,
            "name": experiment.name,
            "tags": experiment.tags or [],
            "notes": experiment.notes,
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
        config=grid.config_label(point),
        seed=int(run.spec["train"]["seed"]),
        epochs_done=run.epochs_done,
        epochs_total=int(run.spec["train"]["epochs"]),
        val_loss=last.val_loss if last else None,
        val_accuracy=last.val_accuracy if last else None,
    )


# A dataset as a grid names it: a built-in by name, an upload by its id.
DatasetKey = tuple[str, str | None]


def dataset_key(spec: RunCreate) -> DatasetKey:
    return spec.dataset.name, None if spec.dataset.id is None else str(spec.dataset.id)


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
        planned = grid.expand(spec)
    except grid.GridError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=str(exc)) from exc
    firsts: dict[DatasetKey, RunCreate] = {}  # each dataset's first run in the grid
    for p in planned:
        firsts.setdefault(dataset_key(p.spec), p.spec)
    shapes = {key: require_dataset(first, settings, session=session) for key, first in firsts.items()}
    require_capacity(
        session=session, owner=owner, limit=settings.max_active_runs_per_key, adding=len(planned)
    )
    experiment = experiment_repo.create_experiment(
        session=session, name=spec.name, spec=spec.model_dump(mode="json"), preset=preset, owner=owner
    )
    runs = [
        experiment_repo.add_run(
            session=session, experiment_id=experiment.id, spec=p.spec, grid_point=p.point, owner=owner
        )
        for p in planned
    ]
    answer = experiment_public(session=session, experiment=experiment)
    # Commit, then publish outside any transaction: a worker must never get an id before its row
    # exists, and ten publishes must not hold the database while the broker answers.
    session.commit()
    location = f"/api/v1/experiments/{experiment.id}"
    ordered = longest_first([(run.id, p.spec) for run, p in zip(runs, planned, strict=True)], shapes)
    _publish_all(session, ordered, location)
    response.headers["Location"] = location
    return answer


def longest_first(
    runs: list[tuple[str, RunCreate]], shapes: Mapping[DatasetKey, DataShape]
) -> list[tuple[str, RunCreate]]:
    """The runs in the order to publish them: the cost model's longest first (ties in grid order),
    each priced on its data's shape (`shapes`, by dataset_key). The training processes take them in
    that order, so the last runs are the shortest and the processes end nearly together; in grid
    order a card whose runs differ several times in cost could end on one process's long run while
    the others had nothing left."""
    return sorted(runs, key=lambda run: -cost.run_seconds(run[1], shapes[dataset_key(run[1])]))


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


def results(session: Session, experiment: Experiment) -> list[report.RunResult]:
    metrics = experiment_repo.metrics_by_run(session=session, experiment_id=experiment.id)
    return [
        report.RunResult(
            point=run.grid_point or {},
            seed=int(run.spec["train"]["seed"]),
            status=run.status,
            epochs=[
                report.EpochRow.stored(m.epoch, m.val_accuracy, m.val_loss, m.train_accuracy, m.train_loss)
                for m in metrics.get(run.id, [])
            ],
        )
        for run in experiment_repo.list_experiment_runs(session=session, experiment_id=experiment.id)
    ]
