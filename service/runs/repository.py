"""Data functions for runs, metrics and artifacts. They use the caller's session and never commit:
the caller (the request dependency or a task's session_scope) owns the transaction."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, String, and_, cast, delete, func, insert, or_, select, update
from sqlalchemy.orm import Session

from service.ml.finite import finite_or_none
from service.ml.probes import ProbeValue, SlotStatistics
from service.ml.training import EpochMetrics
from service.models import (
    EpochMetric,
    Experiment,
    LayerStat,
    ModelArtifact,
    ProbeRecord,
    Recalibration,
    Run,
    RunCheckpoint,
    RunStatus,
    utcnow,
)
from service.runs.schemas import RunCreate

# The first key of the two-int advisory locks that serialise one owner's submits on Postgres
# (count_active_runs); the second is the owner's hash. Any constant no other lock in the database uses.
_OWNER_LOCK_SPACE = 0x626E6C62  # "bnlb"


def create_run(*, session: Session, spec: RunCreate, owner: str | None = None) -> Run:
    # enqueued_at stays empty until the broker has taken the message: the reaper publishes such runs.
    run = Run(name=spec.name, spec=spec.model_dump(mode="json"), status=RunStatus.queued.value, owner=owner)
    session.add(run)
    session.flush()
    return run


def get_run(*, session: Session, run_id: str) -> Run | None:
    return session.get(Run, run_id)


def run_ids_with_prefix(*, session: Session, prefix: str, limit: int) -> list[str]:
    """Ids starting with `prefix` (hex digits only, so LIKE sees no wildcard), at most `limit`."""
    return list(
        session.scalars(select(Run.id).where(Run.id.startswith(prefix)).order_by(Run.id).limit(limit))
    )


def get_run_spec(*, session: Session, run_id: str) -> dict[str, object] | None:
    spec: dict[str, object] | None = session.scalars(select(Run.spec).where(Run.id == run_id)).one_or_none()
    return spec


# Sort keys of the runs list: a column of the run, or a metric of its last finished epoch.
RUN_SORT_COLUMNS = ("created_at", "name", "status", "epochs_done")
RUN_SORT_METRICS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy")


@dataclass(frozen=True)
class RunFilter:
    """What the runs list keeps; None fields filter nothing."""

    status: RunStatus | None = None
    experiment_id: str | None = None
    in_experiment: bool | None = None  # False: only runs submitted alone; True: only experiments' runs
    name: str | None = None  # a substring of the name, any case
    search: str | None = None  # a substring of the name (any case) or a prefix of the id
    norm: str | None = None  # spec.model.norm.kind
    dataset: str | None = None  # spec.dataset.name
    tag: str | None = None  # one of the run's tags, exactly (ASCII: see tagged)

    def where(self) -> list[ColumnElement[bool]]:
        clauses: list[ColumnElement[bool]] = []
        if self.status is not None:
            clauses.append(Run.status == self.status.value)
        if self.experiment_id is not None:
            clauses.append(Run.experiment_id == self.experiment_id)
        if self.in_experiment is not None:
            clauses.append(
                Run.experiment_id.is_not(None) if self.in_experiment else Run.experiment_id.is_(None)
            )
        if self.name:
            clauses.append(func.lower(Run.name).contains(self.name.lower(), autoescape=True))
        if self.search:
            term = self.search.strip().lower()
            clauses.append(
                or_(
                    func.lower(Run.name).contains(term, autoescape=True),
                    Run.id.startswith(term, autoescape=True),
                )
            )
        if self.norm is not None:
            clauses.append(Run.spec[("model", "norm", "kind")].as_string() == self.norm)
        if self.dataset is not None:
            clauses.append(Run.spec[("dataset", "name")].as_string() == self.dataset)
        if self.tag is not None:
            clauses.append(tagged(Run.tags, self.tag))
        return clauses


def tagged(tags: Any, tag: str) -> ColumnElement[bool]:
    """Whether a JSON list of tags holds `tag`: its JSON text contains the tag as a JSON string. The
    same on SQLite (JSON text) and Postgres (JSONB cast to text); an ASCII tag is written alike by
    both, and autoescape keeps `_` literal."""
    return cast(tags, String).contains(json.dumps(tag), autoescape=True)


def list_runs(
    *,
    session: Session,
    status: RunStatus | None = None,
    limit: int,
    offset: int,
    experiment_id: str | None = None,
    where: RunFilter | None = None,
    sort: str = "created_at",
    descending: bool = True,
) -> tuple[Sequence[Run], int]:
    """A page of runs and how many match. `sort` is one of RUN_SORT_COLUMNS or RUN_SORT_METRICS
    (a metric of the last finished epoch; runs without one come last either way); ties go newest
    first."""
    where = where or RunFilter(status=status, experiment_id=experiment_id)
    query = select(Run).where(*where.where())
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    if sort in RUN_SORT_METRICS:
        last = and_(EpochMetric.run_id == Run.id, EpochMetric.epoch == Run.epochs_done)
        query = query.outerjoin(EpochMetric, last)
        key: ColumnElement[object] = getattr(EpochMetric, sort)
    elif sort in RUN_SORT_COLUMNS:
        key = getattr(Run, sort)
    else:
        raise ValueError(f"unknown sort key {sort!r}")
    ordered: list[ColumnElement[Any]] = [key.is_(None), key.desc() if descending else key.asc()]
    if sort != "created_at":
        ordered.append(Run.created_at.desc())
    page = session.scalars(query.order_by(*ordered, Run.id).limit(limit).offset(offset)).all()
    return page, total


def last_epoch_metric(*, session: Session, run: Run) -> EpochMetric | None:
    if run.epochs_done == 0:
        return None
    return session.get(EpochMetric, (run.id, run.epochs_done))


def last_epoch_metrics(*, session: Session, runs: Sequence[Run]) -> dict[str, EpochMetric]:
    """Each of these runs' last finished epoch, in one query (a page of runs, not one query each)."""
    ids = [run.id for run in runs if run.epochs_done > 0]
    if not ids:
        return {}
    rows = session.scalars(
        select(EpochMetric)
        .join(Run, and_(Run.id == EpochMetric.run_id, Run.epochs_done == EpochMetric.epoch))
        .where(Run.id.in_(ids))
    ).all()
    return {row.run_id: row for row in rows}


def list_epoch_metrics(*, session: Session, run_id: str, after_epoch: int = 0) -> Sequence[EpochMetric]:
    """A run's epochs in order; `after_epoch` skips those a caller (a live stream) already has."""
    return session.scalars(
        select(EpochMetric)
        .where(EpochMetric.run_id == run_id, EpochMetric.epoch > after_epoch)
        .order_by(EpochMetric.epoch)
    ).all()


def list_layer_stats(*, session: Session, run_id: str) -> Sequence[LayerStat]:
    """A run's probe statistics (input mean/std per normalisation slot), by epoch then slot order."""
    return session.scalars(
        select(LayerStat).where(LayerStat.run_id == run_id).order_by(LayerStat.epoch, LayerStat.layer)
    ).all()


def list_probe_values(*, session: Session, run_id: str, probe: str) -> Sequence[ProbeRecord]:
    """One probe family's values for a run, by epoch (the caller orders layers naturally)."""
    return session.scalars(
        select(ProbeRecord)
        .where(ProbeRecord.run_id == run_id, ProbeRecord.probe == probe)
        .order_by(ProbeRecord.epoch, ProbeRecord.layer, ProbeRecord.name)
    ).all()


def request_cancel(*, session: Session, run: Run) -> None:
    """A queued run is cancelled at once; a running one is flagged and stops at its next step."""
    run.cancel_requested = True
    if run.status == RunStatus.queued:
        run.status = RunStatus.cancelled.value
        run.finished_at = utcnow()
        drop_checkpoint(session=session, run_id=run.id)  # one handed back at shutdown: never resumed


def drop_checkpoint(*, session: Session, run_id: str) -> None:
    """An ended run resumes nowhere: its training state goes (the model, if any, is the artifact)."""
    session.execute(delete(RunCheckpoint).where(RunCheckpoint.run_id == run_id))


# What PATCH may change on a run or an experiment.
LABEL_FIELDS = ("name", "tags", "notes")


def update_labels(*, target: Run | Experiment, changes: Mapping[str, object]) -> None:
    """Set the name, tags or notes given in `changes`; the others stay."""
    for field in LABEL_FIELDS:
        if field in changes:
            setattr(target, field, changes[field])


def delete_runs(*, session: Session, run_ids: Sequence[str]) -> None:
    """Delete runs and everything stored for them: metrics, probe statistics, checkpoints, models
    and their recalibrations. Aliases that name the runs are the caller's to refuse or remove.

    The runs' rows are locked first (Postgres; SQLite's BEGIN IMMEDIATE already serialises
    writers): a worker's epoch transaction that got in before commits, and its rows are deleted
    here with the rest; one that comes after finds no run to hold and writes nothing
    (record_epoch, finish_held_run and heartbeat are all conditional on the run's row)."""
    if not run_ids:
        return
    session.execute(select(Run.id).where(Run.id.in_(run_ids)).with_for_update())
    session.execute(delete(Recalibration).where(Recalibration.run_id.in_(run_ids)))
    for table in (ModelArtifact, RunCheckpoint, LayerStat, ProbeRecord, EpochMetric):
        session.execute(delete(table).where(table.run_id.in_(run_ids)))
    session.execute(delete(Run).where(Run.id.in_(run_ids)))


@dataclass(frozen=True)
class Lease:
    """Proof that one worker process holds one attempt of a run. Every write a worker makes is
    conditional on it, so a worker that lost its run (reaped, re-delivered) can change nothing."""

    run_id: str
    worker: str
    attempt: int


class LeaseLost(RuntimeError):
    """The run is no longer held by this lease."""


@dataclass(frozen=True)
class RunSignals:
    held: bool
    cancel_requested: bool
    release_requested: bool


def _held(lease: Lease) -> ColumnElement[bool]:
    return and_(
        Run.id == lease.run_id,
        Run.worker == lease.worker,
        Run.attempts == lease.attempt,
        Run.status == RunStatus.running.value,
    )


def _update(session: Session, where: ColumnElement[bool], **values: object) -> bool:
    result = session.execute(
        update(Run)
        .where(where)
        .values(updated_at=utcnow(), **values)
        .execution_options(synchronize_session=False)
    )
    return bool(getattr(result, "rowcount", 0) == 1)


def node_of(worker: str) -> str:
    """The Celery node of a worker id `node/pid`: all pool processes of one worker share it."""
    return worker.rsplit("/", 1)[0]


def claim_run(*, session: Session, run_id: str, worker: str, time_limit_s: int) -> Lease | None:
    """Move a run from queued to running in one conditional UPDATE; None if it was not queued
    (cancelled meanwhile, or already taken by another delivery of the same message), or if this
    worker's own node handed it back while shutting down."""
    now = utcnow()
    released_by_this_node = and_(
        Run.release_requested.is_(True), Run.worker.startswith(f"{node_of(worker)}/", autoescape=True)
    )
    claimed = _update(
        session,
        and_(Run.id == run_id, Run.status == RunStatus.queued.value, ~released_by_this_node),
        status=RunStatus.running.value,
        worker=worker,
        attempts=Run.attempts + 1,
        started_at=func.coalesce(Run.started_at, now),
        heartbeat_at=now,
        deadline_at=now + timedelta(seconds=time_limit_s),
        release_requested=False,
    )
    if not claimed:
        return None
    attempt = session.scalars(select(Run.attempts).where(Run.id == run_id)).one()
    return Lease(run_id=run_id, worker=worker, attempt=attempt)


def heartbeat(*, session: Session, lease: Lease) -> bool:
    return _update(session, _held(lease), heartbeat_at=utcnow())


def read_signals(*, session: Session, lease: Lease) -> RunSignals:
    row = session.execute(
        select(Run.cancel_requested, Run.release_requested).where(_held(lease))
    ).one_or_none()
    if row is None:
        return RunSignals(held=False, cancel_requested=False, release_requested=False)
    return RunSignals(
        held=True, cancel_requested=row.cancel_requested, release_requested=row.release_requested
    )


def resume_point(*, session: Session, run_id: str) -> RunCheckpoint | None:
    """The checkpoint to resume from; metrics of epochs after it are dropped, so that the run's
    history stays one continuous series when those epochs are trained again."""
    checkpoint = session.get(RunCheckpoint, run_id)
    last_epoch = checkpoint.epoch if checkpoint else 0
    session.execute(delete(EpochMetric).where(EpochMetric.run_id == run_id, EpochMetric.epoch > last_epoch))
    session.execute(
        update(Run)
        .where(Run.id == run_id)
        .values(epochs_done=last_epoch)
        .execution_options(synchronize_session=False)
    )
    return checkpoint


def record_epoch(
    *,
    session: Session,
    lease: Lease,
    metrics: EpochMetrics,
    training_state: bytes | None,
    train_samples: int | None = None,
) -> None:
    """An epoch's metrics and the checkpoint taken after it (None: keep none, BNLAB_KEEP_CHECKPOINTS
    =final), together; raises LeaseLost otherwise."""
    if not _update(session, _held(lease), epochs_done=metrics.epoch, heartbeat_at=utcnow()):
        raise LeaseLost(f"run {lease.run_id} is no longer held by {lease.worker} (attempt {lease.attempt})")
    session.add(
        EpochMetric(
            run_id=lease.run_id,
            epoch=metrics.epoch,
            train_loss=finite_or_none(metrics.train_loss),
            train_accuracy=finite_or_none(metrics.train_accuracy),
            val_loss=finite_or_none(metrics.val_loss),
            val_accuracy=finite_or_none(metrics.val_accuracy),
            seconds=metrics.seconds,
            train_seconds=metrics.train_seconds,
            train_samples=train_samples,
        )
    )
    # Replaced as blocks, per epoch: a run resumed after a crash may probe an epoch again (epoch 0
    # comes with epoch 1). A deep network has hundreds of rows an epoch: one bulk insert each, with
    # no ORM object per row (merged one by one, each row cost a read).
    _replace_epochs(session, LayerStat, lease.run_id, metrics.layer_stats)
    _replace_epochs(session, ProbeRecord, lease.run_id, metrics.probes)
    if training_state is not None:
        session.merge(
            RunCheckpoint(run_id=lease.run_id, epoch=metrics.epoch, state=training_state, created_at=utcnow())
        )


def _stored(value: object) -> object:
    """A probe field as the database keeps it: a non-finite float as NULL."""
    return finite_or_none(value) if isinstance(value, float) else value


def _replace_epochs(
    session: Session,
    table: type[LayerStat] | type[ProbeRecord],
    run_id: str,
    values: Sequence[SlotStatistics] | Sequence[ProbeValue],
) -> None:
    """The run's rows of `table` for the epochs in `values` become `values` (the dataclass fields
    are the columns; non-finite floats stored as NULL)."""
    if not values:
        return
    epochs = {value.epoch for value in values}
    session.execute(delete(table).where(table.run_id == run_id, table.epoch.in_(epochs)))
    # The fields read one by one: asdict would deep-copy every value of these flat records.
    names = [f.name for f in fields(values[0])]
    rows = [{"run_id": run_id} | {k: _stored(getattr(value, k)) for k in names} for value in values]
    session.execute(insert(table), rows)


def finish_held_run(*, session: Session, lease: Lease, status: RunStatus, error: str | None = None) -> bool:
    """End a run this lease holds; False (and nothing written) if the lease was lost."""
    finished = _update(session, _held(lease), status=status.value, error=error, finished_at=utcnow())
    if finished:
        drop_checkpoint(session=session, run_id=lease.run_id)
    return finished


def release_held_run(*, session: Session, lease: Lease) -> bool:
    """Hand a run back to the queue (worker shutting down); the attempt does not count.

    `worker` and `release_requested` stay set so that the shutting-down node cannot claim it again;
    `enqueued_at` is cleared so that the next reaper pass of any worker publishes it.
    """
    return _update(
        session, _held(lease), status=RunStatus.queued.value, attempts=Run.attempts - 1, enqueued_at=None
    )


def request_release(*, session: Session, node: str) -> int:
    """Ask every run held by a worker node (all its pool processes) to checkpoint and hand back."""
    result = session.execute(
        update(Run)
        .where(Run.status == RunStatus.running.value, Run.worker.startswith(f"{node}/", autoescape=True))
        .values(release_requested=True)
        .execution_options(synchronize_session=False)
    )
    return int(getattr(result, "rowcount", 0))


def orphaned_runs(*, session: Session, heartbeat_before: datetime) -> Sequence[Run]:
    return session.scalars(
        select(Run).where(Run.status == RunStatus.running.value, Run.heartbeat_at < heartbeat_before)
    ).all()


def _unchanged_orphan(run: Run) -> ColumnElement[bool]:
    """The orphan is still exactly as the reaper saw it: same holder, attempt and last heartbeat."""
    return and_(_held(Lease(run.id, run.worker or "", run.attempts)), Run.heartbeat_at == run.heartbeat_at)


def requeue_orphan(*, session: Session, run: Run) -> bool:
    return _update(
        session, _unchanged_orphan(run), status=RunStatus.queued.value, worker=None, enqueued_at=utcnow()
    )


def fail_orphan(*, session: Session, run: Run, error: str) -> bool:
    failed = _update(
        session, _unchanged_orphan(run), status=RunStatus.failed.value, error=error, finished_at=utcnow()
    )
    if failed:
        drop_checkpoint(session=session, run_id=run.id)
    return failed


def stale_queued_runs(*, session: Session, enqueued_before: datetime) -> Sequence[Run]:
    return session.scalars(
        select(Run).where(
            Run.status == RunStatus.queued.value,
            or_(Run.enqueued_at.is_(None), Run.enqueued_at < enqueued_before),
        )
    ).all()


def mark_enqueued(*, session: Session, run_id: str) -> None:
    session.execute(
        update(Run)
        .where(Run.id == run_id)
        .values(enqueued_at=utcnow())
        .execution_options(synchronize_session=False)
    )


def count_training_demand(*, session: Session, node: str, enough: int) -> int:
    """Processes that the runs wanting worker node `node` train with: the runs it trains, and every
    queued one (an idle training process claims it at once), a data-parallel run counting each of its
    `train.processes`. Counting stops past `enough` runs: more cannot ask for fewer threads."""
    running = Run.status == RunStatus.running.value
    on_node = and_(running, Run.worker.startswith(f"{node}/", autoescape=True))
    wanted = or_(on_node, Run.status == RunStatus.queued.value)
    specs = session.scalars(select(Run.spec).where(wanted).limit(enough))
    return sum(max(1, int(spec.get("train", {}).get("processes", 1))) for spec in specs)


def count_active_runs(*, session: Session, owner: str | None) -> int:
    """Queued and running runs of `owner`. On Postgres the count first takes a transaction-scoped
    advisory lock for the owner, so that two concurrent submits of one key count and insert one after
    the other (READ COMMITTED would let both pass the cap); the caller's commit releases it. SQLite
    needs none: its write transactions (BEGIN IMMEDIATE) are serialised already."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(select(func.pg_advisory_xact_lock(_OWNER_LOCK_SPACE, func.hashtext(owner or ""))))
    active = (RunStatus.queued.value, RunStatus.running.value)
    query = select(func.count()).select_from(Run).where(Run.status.in_(active), Run.owner == owner)
    return session.scalar(query) or 0


def save_artifact(
    *, session: Session, run_id: str, weights: bytes, model_config: dict[str, object], sha256: str
) -> ModelArtifact:
    artifact = ModelArtifact(
        run_id=run_id,
        version=1,
        weights=weights,
        model_config=model_config,
        sha256=sha256,
        size_bytes=len(weights),
    )
    session.add(artifact)
    return artifact


def get_artifact(*, session: Session, run_id: str, version: int = 1) -> ModelArtifact | None:
    return session.get(ModelArtifact, (run_id, version))
