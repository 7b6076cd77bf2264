"""Data functions for experiments and the runs they own.

Like service.runs.repository, they use the caller's session and never commit: the caller owns the transaction.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from sqlalchemy import and_, delete, func, or_, select
from sqlalchemy.orm import Session

from service.models import EpochMetric, Experiment, ModelArtifact, Run, RunStatus
from service.runs import repository as run_repo
from service.runs.schemas import RunCreate
from service.serving.schemas import AliasMetric


def create_experiment(
    *, session: Session, name: str, spec: dict[str, Any], preset: str | None, owner: str | None
) -> Experiment:
    experiment = Experiment(name=name, spec=spec, preset=preset, owner=owner)
    session.add(experiment)
    session.flush()
    return experiment


def add_run(
    *, session: Session, experiment_id: str, spec: RunCreate, grid_point: dict[str, Any], owner: str | None
) -> Run:
    run = run_repo.create_run(session=session, spec=spec, owner=owner)
    run.experiment_id = experiment_id
    run.grid_point = grid_point
    return run


def get_experiment(*, session: Session, experiment_id: str) -> Experiment | None:
    return session.get(Experiment, experiment_id)


def experiment_ids_with_prefix(*, session: Session, prefix: str, limit: int) -> list[str]:
    """Ids starting with `prefix` (hex digits only, so LIKE sees no wildcard), at most `limit`."""
    query = select(Experiment.id).where(Experiment.id.startswith(prefix)).order_by(Experiment.id).limit(limit)
    return list(session.scalars(query))


def list_experiments(
    *,
    session: Session,
    limit: int,
    offset: int,
    search: str | None = None,
    preset: str | None = None,
    sort: str = "created_at",
    descending: bool = True,
) -> tuple[Sequence[Experiment], int]:
    """A page of experiments and how many match: `search` is a part of the name (any case) or a
    prefix of the id; ties go newest first."""
    query = select(Experiment)
    if search:
        term = search.strip().lower()
        query = query.where(
            or_(
                func.lower(Experiment.name).contains(term, autoescape=True),
                Experiment.id.startswith(term, autoescape=True),
            )
        )
    if preset is not None:
        query = query.where(Experiment.preset == preset)
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    key = Experiment.name if sort == "name" else Experiment.created_at
    page = session.scalars(
        query.order_by(key.desc() if descending else key.asc(), Experiment.created_at.desc(), Experiment.id)
        .limit(limit)
        .offset(offset)
    ).all()
    return page, total


def delete_experiment(*, session: Session, experiment: Experiment) -> None:
    """Delete an experiment with its runs and all they stored (run_repo.delete_runs)."""
    run_ids = list(session.scalars(select(Run.id).where(Run.experiment_id == experiment.id)))
    run_repo.delete_runs(session=session, run_ids=run_ids)
    session.execute(delete(Experiment).where(Experiment.id == experiment.id))


def list_experiment_runs(*, session: Session, experiment_id: str) -> Sequence[Run]:
    return session.scalars(
        select(Run).where(Run.experiment_id == experiment_id).order_by(Run.created_at, Run.id)
    ).all()


def metrics_by_run(*, session: Session, experiment_id: str) -> dict[str, list[EpochMetric]]:
    """Every epoch of every run of the experiment, in one query, by run then epoch."""
    rows = session.scalars(
        select(EpochMetric)
        .join(Run, Run.id == EpochMetric.run_id)
        .where(Run.experiment_id == experiment_id)
        .order_by(EpochMetric.run_id, EpochMetric.epoch)
    ).all()
    grouped: dict[str, list[EpochMetric]] = defaultdict(list)
    for row in rows:
        grouped[row.run_id].append(row)
    return grouped


def best_run(*, session: Session, experiment_id: str, metric: AliasMetric) -> tuple[str, float] | None:
    """The succeeded run with a stored model whose last epoch is best by `metric` (max accuracy, min
    loss), and that value; ties go to the earlier run. None when no run qualifies yet.

    The last epoch, because it is the stored model that an alias serves.
    """
    column = getattr(EpochMetric, metric)
    has_model = select(ModelArtifact.run_id).where(ModelArtifact.run_id == Run.id).exists()
    row = session.execute(
        select(Run.id, column)
        .join(EpochMetric, and_(EpochMetric.run_id == Run.id, EpochMetric.epoch == Run.epochs_done))
        .where(
            Run.experiment_id == experiment_id,
            Run.status == RunStatus.succeeded.value,
            column.is_not(None),
            has_model,
        )
        .order_by(column.desc() if metric.endswith("accuracy") else column.asc(), Run.created_at, Run.id)
        .limit(1)
    ).first()
    return None if row is None else (row[0], float(row[1]))
