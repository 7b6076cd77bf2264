"""Data functions for served models: artifact versions, aliases and recalibrations.

Like service.runs.repository, they use the caller's session and never commit: the caller owns the transaction.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast, get_args

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session, defer

from service.experiments import repository as experiment_repo
from service.models import ModelAlias, ModelArtifact, Recalibration, Run, RunStatus
from service.serving.schemas import AliasMetric

RUN_ID = re.compile(r"^[0-9a-f]{32}$")
ALIAS_METRICS: tuple[str, ...] = get_args(AliasMetric)


@dataclass(frozen=True)
class ResolvedModel:
    """A model name (run id or alias) and an optional version, resolved to a stored artifact."""

    name: str
    run_id: str
    version: int
    sha256: str
    versions: list[int]  # every stored version of the run, ascending


class NameNotFound(LookupError):
    """Neither a run id nor an alias."""


class VersionNotFound(NameNotFound):
    """The name exists, but its run has no such stored version (or none yet)."""


class NoQualifyingRun(VersionNotFound):
    """An experiment alias whose experiment has no succeeded run with a model yet."""


def artifact_versions(*, session: Session, run_id: str) -> list[int]:
    return list(
        session.scalars(
            select(ModelArtifact.version)
            .where(ModelArtifact.run_id == run_id)
            .order_by(ModelArtifact.version)
        )
    )


def artifact_sha256(*, session: Session, run_id: str, version: int) -> str | None:
    return session.scalar(
        select(ModelArtifact.sha256).where(ModelArtifact.run_id == run_id, ModelArtifact.version == version)
    )


def get_artifact(*, session: Session, run_id: str, version: int) -> ModelArtifact | None:
    return session.get(ModelArtifact, (run_id, version))


def list_artifacts(*, session: Session, run_id: str) -> Sequence[ModelArtifact]:
    """Stored versions without loading their weights."""
    return session.scalars(
        select(ModelArtifact)
        .options(defer(ModelArtifact.weights))
        .where(ModelArtifact.run_id == run_id)
        .order_by(ModelArtifact.version)
    ).all()


def resolve_model(*, session: Session, name: str, version: int | None) -> ResolvedModel:
    """A run id or an alias, and a version (None: the alias's pinned one, else the newest).

    Two indexed reads at most (the alias, the run's artifact versions), three for an experiment
    alias (its best run so far): it runs for every request.
    Raises NameNotFound for an unknown name, VersionNotFound for a version the run does not have.
    """
    pinned = None
    if RUN_ID.match(name):
        run_id = name
    else:
        alias = session.get(ModelAlias, name)
        if alias is None:
            raise NameNotFound(f"no model named {name} (neither a run id nor an alias)")
        run_id, pinned = alias_target(session=session, alias=alias)
    rows = session.execute(
        select(ModelArtifact.version, ModelArtifact.sha256)
        .where(ModelArtifact.run_id == run_id)
        .order_by(ModelArtifact.version)
    ).all()
    shas = {row.version: row.sha256 for row in rows}
    run = None if shas else session.get(Run, run_id)
    if not shas and run is None:
        raise NameNotFound(f"no model named {name}")
    if run is not None:  # a run without a stored model: say why, whatever version was asked for
        raise VersionNotFound(f"model {name} has no stored version: {no_model_reason(run)}")
    if version is None:
        version = pinned if pinned is not None else max(shas)
    if version not in shas:
        raise VersionNotFound(f"model {name} has no version {version} (versions {', '.join(map(str, shas))})")
    return ResolvedModel(name=name, run_id=run_id, version=version, sha256=shas[version], versions=list(shas))


def no_model_reason(run: Run) -> str:
    """Why a run has no stored model, from what happened to it (an ended run never will)."""
    if run.status == RunStatus.failed:
        return f"run {run.id} failed ({run.error})" if run.error else f"run {run.id} failed"
    if run.status == RunStatus.cancelled:
        return f"run {run.id} was cancelled before it finished"
    if run.status == RunStatus.succeeded:
        return f"run {run.id} succeeded but its model is missing"
    return f"run {run.id} is {run.status}; it gets a model if it succeeds"


# ---------------------------------------------------------------------------------------- aliases


def alias_target(*, session: Session, alias: ModelAlias) -> tuple[str, int | None]:
    """The run (and pinned version) an alias serves now. An experiment alias is resolved here, at
    use, to its best run so far; raises NoQualifyingRun while none has succeeded with a model."""
    if alias.run_id is not None:
        return alias.run_id, alias.version
    best = experiment_best(session=session, alias=alias)
    if best is None:
        raise NoQualifyingRun(
            f"alias {alias.name} serves the best run of experiment {alias.experiment_id} by {alias.metric}, "
            f"and {no_qualifying_run_reason(session=session, experiment_id=alias.experiment_id or '')}"
        )
    return best[0], None


def no_qualifying_run_reason(*, session: Session, experiment_id: str) -> str:
    """Why no run of an experiment can be served: still training, or ended without a model."""
    runs = experiment_repo.list_experiment_runs(session=session, experiment_id=experiment_id)
    active = sum(not RunStatus(run.status).is_finished for run in runs)
    if active:
        still = f"{active} of {len(runs)} still queued or running"
        return f"none of its runs has succeeded with a model yet ({still})"
    return f"none of its {len(runs)} runs succeeded with a model, and all have ended"


def experiment_has_ended(*, session: Session, experiment_id: str) -> bool:
    runs = experiment_repo.list_experiment_runs(session=session, experiment_id=experiment_id)
    return all(RunStatus(run.status).is_finished for run in runs)


def experiment_best(*, session: Session, alias: ModelAlias) -> tuple[str, float] | None:
    """An experiment alias's best run and its metric value now; None when no run qualifies."""
    metric = alias.metric if alias.metric in ALIAS_METRICS else "val_accuracy"
    return experiment_repo.best_run(
        session=session, experiment_id=alias.experiment_id or "", metric=cast(AliasMetric, metric)
    )


def aliases_naming(
    *, session: Session, run_ids: Sequence[str], experiment_id: str | None = None
) -> list[str]:
    """Names of the aliases that point at any of these runs, or at the experiment."""
    names_run = ModelAlias.run_id.in_(run_ids)
    names = or_(names_run, ModelAlias.experiment_id == experiment_id) if experiment_id else names_run
    return list(session.scalars(select(ModelAlias.name).where(names).order_by(ModelAlias.name)))


def get_alias(*, session: Session, name: str) -> ModelAlias | None:
    return session.get(ModelAlias, name)


def list_aliases(*, session: Session) -> Sequence[ModelAlias]:
    return session.scalars(select(ModelAlias).order_by(ModelAlias.name)).all()


def put_alias(
    *,
    session: Session,
    name: str,
    run_id: str | None,
    version: int | None,
    experiment_id: str | None = None,
    metric: str | None = None,
) -> tuple[ModelAlias, bool]:
    """Create or re-point an alias (to a run, or to an experiment's best run by a metric); returns
    it and whether it was created."""
    alias = session.get(ModelAlias, name)
    created = alias is None
    if alias is None:
        alias = ModelAlias(name=name)
        session.add(alias)
    alias.run_id, alias.version = run_id, version
    alias.experiment_id, alias.metric = experiment_id, metric
    session.flush()
    return alias, created


def delete_alias(*, session: Session, alias: ModelAlias) -> None:
    session.delete(alias)


# ---------------------------------------------------------------------------------------- recalibration


def next_version(*, session: Session, run_id: str) -> int:
    current = session.scalar(select(func.max(ModelArtifact.version)).where(ModelArtifact.run_id == run_id))
    return (current or 0) + 1


def save_recalibrated_version(
    *,
    session: Session,
    run_id: str,
    weights: bytes,
    model_config: dict[str, object],
    sha256: str,
    recalibration: Recalibration,
) -> int:
    """Store the weights as the run's next version with how they were made; returns the version.

    Two processes recalibrating the same run at once race for the same number: the loser's flush
    raises IntegrityError, and the caller may retry.
    """
    version = next_version(session=session, run_id=run_id)
    session.add(
        ModelArtifact(
            run_id=run_id,
            version=version,
            weights=weights,
            model_config=model_config,
            sha256=sha256,
            size_bytes=len(weights),
        )
    )
    session.flush()  # the artifact row first: the recalibration's foreign key points at it
    recalibration.run_id = run_id
    recalibration.version = version
    session.add(recalibration)
    session.flush()
    return version


def get_recalibrations(*, session: Session, run_id: str) -> dict[int, Recalibration]:
    rows = session.scalars(select(Recalibration).where(Recalibration.run_id == run_id)).all()
    return {row.version: row for row in rows}
