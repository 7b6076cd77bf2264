"""Execute one training run: the domain function behind the Celery task.

The task passes a run id. This module claims the run (a lease in the database), resumes it from its
last checkpoint if an earlier attempt got that far, trains it while a heartbeat thread proves the
worker alive, and records the outcome — every write conditional on still holding the lease, so a
worker that lost its run (reaped after a stall, say) can neither finish it nor store a second model.
Weights and the final status are written in one transaction: a run is never `succeeded` without them.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from sqlalchemy.orm import Session

from service import crud, data
from service.budget import time_limit_s
from service.config import get_settings
from service.db import session_scope
from service.ml import checkpoints, datasets, distributed, resume, stacked, training
from service.ml.config import ModelConfig
from service.models import RunStatus
from service.queue import enqueue_training
from service.schemas import MAX_EXPERIMENT_RUNS, RunCreate

log = logging.getLogger(__name__)


class StopReason(Enum):
    cancelled = "cancelled"
    released = "released"  # the worker is shutting down: hand the run back to the queue
    lease_lost = "lease_lost"


class RunTimeout(Exception):
    """The run overran the time limit derived from its spec."""


@dataclass
class DatabaseCallbacks:
    """Reports progress (metrics + checkpoint, atomically) and reads the run's stop signals."""

    lease: crud.Lease
    time_limit_s: int
    lease_lost: threading.Event = field(default_factory=threading.Event)
    stop_reason: StopReason | None = None
    started: float = field(default_factory=time.monotonic)
    # Size of the training split, once loaded: stored with each epoch for its throughput.
    train_samples: int | None = None

    def on_epoch_end(self, metrics: training.EpochMetrics, snapshot: training.Snapshot) -> None:
        try:
            with session_scope() as session:
                crud.record_epoch(
                    session=session,
                    lease=self.lease,
                    metrics=metrics,
                    # Not even serialised when not kept (BNLAB_KEEP_CHECKPOINTS=final).
                    training_state=snapshot() if get_settings().keep_checkpoints == "epoch" else None,
                    train_samples=self.train_samples,
                )
        except crud.LeaseLost:
            self.lease_lost.set()
            return
        log.info("run %s epoch %d: val_accuracy=%.4f", self.lease.run_id, metrics.epoch, metrics.val_accuracy)

    def should_stop(self) -> bool:
        # Celery's soft time limit does the same, but only for messages that carry it; this one
        # holds whatever delivered the run.
        if time.monotonic() - self.started > self.time_limit_s:
            raise RunTimeout(f"{self.time_limit_s} s")
        if self.lease_lost.is_set():
            self.stop_reason = StopReason.lease_lost
            return True
        with session_scope() as session:
            signals = crud.read_signals(session=session, lease=self.lease)
        if not signals.held:
            self.stop_reason = StopReason.lease_lost
        elif signals.cancel_requested:
            self.stop_reason = StopReason.cancelled
        elif signals.release_requested:
            self.stop_reason = StopReason.released
        return self.stop_reason is not None


class Heartbeat:
    """A daemon thread that renews the lease every heartbeat interval while a run trains."""

    def __init__(self, lease: crud.Lease, lost: threading.Event) -> None:
        self._lease, self._lost = lease, lost
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{lease.run_id}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _beat(self) -> None:
        interval = get_settings().heartbeat_interval_s
        while not self._stop.wait(interval):
            try:
                with session_scope() as session:
                    held = crud.heartbeat(session=session, lease=self._lease)
            except Exception:  # a database blip: the next beat retries; the lease timeout is the limit
                log.warning("heartbeat for run %s failed", self._lease.run_id, exc_info=True)
                continue
            if not held:
                self._lost.set()
                return


def dataset_search_dirs() -> list[Path]:
    return data.search_dirs(get_settings())


def load_training_data(spec: RunCreate) -> tuple[datasets.ImageDataset, datasets.ImageDataset]:
    return data.load_training_data(spec)


def describe_error(exc: BaseException) -> str:
    # Errors written for users keep their text; a time limit says which; anything else keeps its type.
    if isinstance(exc, datasets.DatasetError | checkpoints.CheckpointError | resume.ResumeError):
        return str(exc)
    if isinstance(exc, RunTimeout) or type(exc).__name__ == "SoftTimeLimitExceeded":
        return f"timeout: the run overran its time limit ({exc})"
    return f"{type(exc).__name__}: {exc}"


def run_time_limit_s(spec: RunCreate, *, session: Session) -> int:
    cap_s = get_settings().max_run_seconds
    try:
        shape = data.data_shape(session=session, dataset=spec.dataset)
    except data.UnknownDataset:
        return cap_s  # an upload deleted since submission: the run fails as it loads its data
    model = data.model_config(spec, shape)
    return time_limit_s(spec, cap_s=cap_s, model=model, train_samples=shape.train_samples)


def publish(run_id: str, spec: RunCreate) -> None:
    """Publish a committed run's task with the time limits its spec earns."""
    with session_scope() as session:
        limit_s = run_time_limit_s(spec, session=session)
    enqueue_training(run_id, time_limit_s=limit_s)


def execute_run(run_id: str, *, worker: str) -> RunStatus | None:
    """Train run `run_id` to its end. Returns the final status, or None if this delivery did not
    end the run (not queued, handed back on shutdown, or lease lost)."""
    with session_scope() as session:
        raw_spec = crud.get_run_spec(session=session, run_id=run_id)
        if raw_spec is None:
            log.warning("no run %s; discarding this message", run_id)
            return None
        spec = RunCreate.model_validate(raw_spec)
        limit_s = run_time_limit_s(spec, session=session)
        lease = crud.claim_run(session=session, run_id=run_id, worker=worker, time_limit_s=limit_s)
        if lease is None:
            log.info("run %s is not queued (cancelled, finished or taken); skipping this delivery", run_id)
            return None
        checkpoint = crud.resume_point(session=session, run_id=run_id)
        start_state = checkpoint.state if checkpoint else None
        partners = [] if checkpoint else claim_stack(lease, spec, limit_s, session=session)
    if partners:
        return _execute_stack([(lease, spec), *partners], limit_s)
    log.info("run %s attempt %d started on %s", run_id, lease.attempt, worker)
    callbacks = DatabaseCallbacks(lease, limit_s)
    try:
        with Heartbeat(lease, callbacks.lease_lost):
            result, config = _train(spec, callbacks, start_state)
        if result.cancelled:
            return _stop(lease, callbacks.stop_reason or StopReason.cancelled)
        weights = checkpoints.save_checkpoint(result.model, config)
    except Exception as exc:
        log.exception("run %s failed", run_id)
        return _end(lease, RunStatus.failed, describe_error(exc))
    return _succeed(lease, config, weights)


def claim_stack(lease: crud.Lease, spec: RunCreate, time_limit_s: int, *, session: Session) -> list[Member]:
    """Claim, for the fresh run just claimed, queued runs of its experiment that are the same run but
    for the seed, to train with it as one stacked model (service/ml/stacked.py; each result is what
    the run would give alone). Their own messages find them taken and are skipped.

    How many: at most BNLAB_STACK_RUNS in all. While the experiment has at least as many such groups
    of alike runs queued as the worker has idle training processes (this one included), a process
    takes its run's whole group; with fewer, each group is split among the idle processes, so that no
    core waits while one process trains all."""
    settings = get_settings()
    if settings.stack_runs < 2:  # the default: every run trains alone
        return []
    run = crud.get_run(session=session, run_id=lease.run_id)
    if run is None or run.experiment_id is None:
        return []
    queued = crud.fresh_queued_runs(
        session=session, experiment_id=run.experiment_id, limit=MAX_EXPERIMENT_RUNS
    )
    key = _stack_key(spec.model_dump(mode="json"))
    keys = [_stack_key(raw) for _, raw in queued]
    alike = [(run_id, raw) for (run_id, raw), other in zip(queued, keys, strict=True) if other == key]
    groups = len(set(keys) | {key})
    idle = settings.training_processes - crud.busy_processes(session=session, worker=lease.worker)
    parts = max(1, math.ceil(idle / groups))
    wanted = min(settings.stack_runs, math.ceil((len(alike) + 1) / parts)) - 1
    if wanted < 1 or not _stackable(spec, session=session):
        return []
    partners: list[Member] = []
    for run_id, raw in alike:
        if len(partners) == wanted:
            break
        partner = crud.claim_run(
            session=session, run_id=run_id, worker=lease.worker, time_limit_s=time_limit_s
        )
        if partner is not None:
            partners.append((partner, RunCreate.model_validate(raw)))
    return partners


Member = tuple[crud.Lease, RunCreate]


def _stack_key(spec: dict[str, object]) -> str:
    """What the runs of one stack share, from a stored spec: all of it but its name and seed."""
    train = spec.get("train")
    shared = {**spec, "name": None, "train": {**train, "seed": None} if isinstance(train, dict) else train}
    return json.dumps(shared, sort_keys=True)


def _stackable(spec: RunCreate, *, session: Session) -> bool:
    if training.resolve_device(get_settings().device).type != "cpu":
        return False  # stacked training is exact as tested on the CPU; elsewhere runs train alone
    try:
        shape = data.data_shape(session=session, dataset=spec.dataset)
    except data.UnknownDataset:
        return False
    return stacked.can_stack(data.model_config(spec, shape), spec.train_config_for_ml())


def _execute_stack(members: list[Member], limit_s: int) -> RunStatus | None:
    """Train the claimed runs as one stack and record each outcome as execute_run would; returns the
    first (the delivered run's) status."""
    leases = [lease for lease, _ in members]
    log.info(
        "run %s trains stacked with %d runs of its experiment: %s",
        leases[0].run_id, len(leases) - 1, ", ".join(lease.run_id for lease in leases[1:]),
    )  # fmt: skip
    callbacks = [DatabaseCallbacks(lease, limit_s) for lease in leases]
    outcomes: dict[int, RunStatus | None] = {}

    def record_leaving(k: int, result: training.TrainResult) -> None:
        outcomes[k] = _stop(leases[k], callbacks[k].stop_reason or StopReason.cancelled)

    spec = members[0][1]
    try:
        with ExitStack() as heartbeats:
            for beat in callbacks:
                heartbeats.enter_context(Heartbeat(beat.lease, beat.lease_lost))
            train_set, val_set, config = _load_data(spec, callbacks)
            tcfgs = [other.train_config_for_ml() for _, other in members]
            results = stacked.train_stacked(config, tcfgs, train_set, val_set, callbacks, record_leaving)
            weights = {
                k: checkpoints.save_checkpoint(r.model, config)
                for k, r in enumerate(results)
                if k not in outcomes
            }
    except Exception as exc:
        log.exception("stacked runs %s failed", ", ".join(lease.run_id for lease in leases))
        error = describe_error(exc)
        for k, lease in enumerate(leases):
            if k not in outcomes:
                outcomes[k] = _end(lease, RunStatus.failed, error)
        return outcomes[0]
    for k, lease in enumerate(leases):
        if k not in outcomes:
            outcomes[k] = _succeed(lease, config, weights[k])
    return outcomes[0]


def _load_data(
    spec: RunCreate, callbacks: list[DatabaseCallbacks]
) -> tuple[datasets.ImageDataset, datasets.ImageDataset, ModelConfig]:
    """The spec's splits and its network for them; the callbacks learn the training split's size."""
    train_set, val_set = load_training_data(spec)
    for each in callbacks:
        each.train_samples = len(train_set)
    return train_set, val_set, model_config_for_data(spec, train_set)


def model_config_for_data(spec: RunCreate, train_set: datasets.ImageDataset) -> ModelConfig:
    """The spec's network for the data as loaded: its sample shape, classes and input scaling."""
    shape = datasets.DataShape(
        train_set.sample_shape, train_set.num_classes, train_set.input_kind, len(train_set)
    )
    return data.model_config(spec, shape)


def _train(
    spec: RunCreate, callbacks: DatabaseCallbacks, start_state: bytes | None
) -> tuple[training.TrainResult, ModelConfig]:
    train_set, val_set, config = _load_data(spec, [callbacks])
    state = resume.load_training_state(start_state) if start_state else None
    if state is not None:
        log.info("run %s resumes after epoch %d", callbacks.lease.run_id, state.epoch)
    tcfg = spec.train_config_for_ml()
    device = training.resolve_device(get_settings().device)
    if tcfg.processes > 1:  # data-parallel processes: gloo on the CPU, NCCL across GPUs
        result = distributed.train_distributed(
            config, tcfg, train_set, val_set, callbacks, resume=state, device=device
        )
        return result, config
    result = training.train(config, tcfg, train_set, val_set, callbacks, resume=state, device=device)
    return result, config


def _succeed(lease: crud.Lease, config: ModelConfig, weights: bytes) -> RunStatus | None:
    with session_scope() as session:
        if not crud.finish_held_run(session=session, lease=lease, status=RunStatus.succeeded):
            log.warning("run %s: lease lost before the model was stored; discarding it", lease.run_id)
            return None
        crud.save_artifact(
            session=session,
            run_id=lease.run_id,
            weights=weights,
            model_config=config.to_dict(),
            sha256=checkpoints.sha256_hex(weights),
        )
    log.info("run %s succeeded", lease.run_id)
    return RunStatus.succeeded


def _stop(lease: crud.Lease, reason: StopReason) -> RunStatus | None:
    if reason is StopReason.cancelled:
        return _end(lease, RunStatus.cancelled)
    if reason is StopReason.released:
        # Not published from here: this node is shutting down and could receive it again. The
        # reaper of any other worker (or of this one, restarted) publishes it on its next pass.
        with session_scope() as session:
            if crud.release_held_run(session=session, lease=lease):
                log.info("run %s handed back to the queue at shutdown", lease.run_id)
        return None
    with session_scope() as session:
        deleted = crud.get_run(session=session, run_id=lease.run_id) is None
    if deleted:  # DELETE /api/v1/runs/{id} while it trained: nothing of it is written any more
        log.info("run %s was deleted while it trained; this attempt stops", lease.run_id)
        return None
    log.warning("run %s: lease lost (reaped or re-delivered); this attempt stops", lease.run_id)
    return None


def _end(lease: crud.Lease, status: RunStatus, error: str | None = None) -> RunStatus | None:
    with session_scope() as session:
        ended = crud.finish_held_run(session=session, lease=lease, status=status, error=error)
    if not ended:
        log.warning("run %s: lease lost; not recording %s", lease.run_id, status.value)
        return None
    log.info("run %s ended %s", lease.run_id, status.value)
    return status
