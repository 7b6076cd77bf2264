"""Execute one training run: the domain function behind the Celery task.

The task passes a run id. This module claims the run (a lease in the database), resumes it from its
last checkpoint if an earlier attempt got that far, trains it while a heartbeat thread proves the
worker alive, and records the outcome — every write conditional on still holding the lease, so a
worker that lost its run (reaped after a stall, say) can neither finish it nor store a second model.
Weights and the final status are written in one transaction: a run is never `succeeded` without them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from service.config import get_settings
from service.datasets import loading
from service.db import session_scope
from service.ml import checkpoints, datasets, distributed, resume, training
from service.ml.config import ModelConfig
from service.models import RunStatus
from service.runs import repository as run_repo
from service.runs.budget import run_time_limit_s
from service.runs.cores import CoreShare
from service.runs.schemas import RunCreate
from service.runs.spec import model_config, train_config

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

    lease: run_repo.Lease
    time_limit_s: int
    lease_lost: threading.Event = field(default_factory=threading.Event)
    stop_reason: StopReason | None = None
    started: float = field(default_factory=time.monotonic)
    # Size of the training split, once loaded: stored with each epoch for its throughput.
    train_samples: int | None = None
    # This process's threads, sized to the node's idle cores while the run trains (single-process runs).
    cores: CoreShare | None = None
    # Called with the run id once an epoch is stored (the worker passes the searches' hook).
    on_epoch: Callable[[str], None] | None = None
    # The spec's last epoch: its training state is not stored (below).
    final_epoch: int | None = None

    def on_epoch_end(self, metrics: training.EpochMetrics, snapshot: training.Snapshot) -> None:
        try:
            with session_scope() as session:
                run_repo.record_epoch(
                    session=session,
                    lease=self.lease,
                    metrics=metrics,
                    training_state=snapshot() if self._keeps_state_of(metrics.epoch) else None,
                    train_samples=self.train_samples,
                )
        except run_repo.LeaseLost:
            self.lease_lost.set()
            return
        log.info("run %s epoch %d: val_accuracy=%.4f", self.lease.run_id, metrics.epoch, metrics.val_accuracy)
        if self.on_epoch is not None:
            notify(self.on_epoch, self.lease.run_id)

    def _keeps_state_of(self, epoch: int) -> bool:
        # Not even serialised when not kept (BNLAB_KEEP_CHECKPOINTS=final). The last epoch's state
        # would be deleted a moment later, as the run succeeds with its final model; a crash in
        # between resumes from the epoch before and trains the last one again.
        return get_settings().keep_checkpoints == "epoch" and epoch != self.final_epoch

    def should_stop(self) -> bool:
        # Celery's soft time limit does the same, but only for messages that carry it; this one
        # holds whatever delivered the run.
        if time.monotonic() - self.started > self.time_limit_s:
            raise RunTimeout(f"{self.time_limit_s} s")
        if self.lease_lost.is_set():
            self.stop_reason = StopReason.lease_lost
            return True
        # Read only: no wait behind the write lock another training process holds (SQLite).
        with session_scope(read_only=True) as session:
            signals = run_repo.read_signals(session=session, lease=self.lease)
            if self.cores is not None:
                self.cores.resize(session)
        if not signals.held:
            self.stop_reason = StopReason.lease_lost
        elif signals.cancel_requested:
            self.stop_reason = StopReason.cancelled
        elif signals.release_requested:
            self.stop_reason = StopReason.released
        return self.stop_reason is not None


def notify(hook: Callable[[str], None], run_id: str) -> None:
    """Call a run-event hook; its failure is logged, never the run's."""
    try:
        hook(run_id)
    except Exception:
        log.exception("run %s: the run-event hook %s failed", run_id, getattr(hook, "__name__", hook))


class Heartbeat:
    """A daemon thread that renews the lease every heartbeat interval while a run trains."""

    def __init__(self, lease: run_repo.Lease, lost: threading.Event) -> None:
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
                    held = run_repo.heartbeat(session=session, lease=self._lease)
            except Exception:  # a database blip: the next beat retries; the lease timeout is the limit
                log.warning("heartbeat for run %s failed", self._lease.run_id, exc_info=True)
                continue
            if not held:
                self._lost.set()
                return


def describe_error(exc: BaseException) -> str:
    # Errors written for users keep their text; a time limit says which; anything else keeps its type.
    if isinstance(exc, datasets.DatasetError | checkpoints.CheckpointError | resume.ResumeError):
        return str(exc)
    if isinstance(exc, RunTimeout) or type(exc).__name__ == "SoftTimeLimitExceeded":
        return f"timeout: the run overran its time limit ({exc})"
    return f"{type(exc).__name__}: {exc}"


def diverged_error(result: training.TrainResult) -> str:
    """The error of a run whose loss became NaN or infinite: where, and what it means for the run."""
    last = result.epochs[-1]
    return (
        f"diverged: the loss became non-finite at epoch {result.diverged_at} (training loss "
        f"{last.train_loss}, validation loss {last.val_loss}); training stopped there, the epochs up to "
        "it are stored (non-finite values as null) and no model was saved"
    )


def execute_run(
    run_id: str, *, worker: str, on_epoch: Callable[[str], None] | None = None
) -> RunStatus | None:
    """Train run `run_id` to its end. Returns the final status, or None if this delivery did not
    end the run (not queued, handed back on shutdown, or lease lost). `on_epoch` is called with the
    run id after each stored epoch."""
    with session_scope() as session:
        raw_spec = run_repo.get_run_spec(session=session, run_id=run_id)
        if raw_spec is None:
            log.warning("no run %s; discarding this message", run_id)
            return None
        spec = RunCreate.model_validate(raw_spec)
        limit_s = run_time_limit_s(spec, session=session)
        lease = run_repo.claim_run(session=session, run_id=run_id, worker=worker, time_limit_s=limit_s)
        if lease is None:
            log.info("run %s is not queued (cancelled, finished or taken); skipping this delivery", run_id)
            return None
        checkpoint = run_repo.resume_point(session=session, run_id=run_id)
        start_state = checkpoint.state if checkpoint else None
    log.info("run %s attempt %d started on %s", run_id, lease.attempt, worker)
    callbacks = DatabaseCallbacks(lease, limit_s, on_epoch=on_epoch, final_epoch=spec.train.epochs)
    try:
        with Heartbeat(lease, callbacks.lease_lost):
            result, config = _train(spec, callbacks, start_state)
        if result.cancelled:
            return _stop(lease, callbacks.stop_reason or StopReason.cancelled)
        if result.diverged_at is not None:
            return _end(lease, RunStatus.failed, diverged_error(result))
        weights = checkpoints.save_checkpoint(result.model, config)
    except Exception as exc:
        log.exception("run %s failed", run_id)
        return _end(lease, RunStatus.failed, describe_error(exc))
    finally:
        if callbacks.cores is not None:
            callbacks.cores.restore()
    return _succeed(lease, config, weights)


def _load_data(
    spec: RunCreate, callbacks: DatabaseCallbacks
) -> tuple[datasets.ImageDataset, datasets.ImageDataset, ModelConfig]:
    """The spec's splits and its network for them; the callbacks learn the training split's size."""
    train_set, val_set = loading.load_training_data(spec)
    callbacks.train_samples = len(train_set)
    return train_set, val_set, model_config_for_data(spec, train_set)


def model_config_for_data(spec: RunCreate, train_set: datasets.ImageDataset) -> ModelConfig:
    """The spec's network for the data as loaded: its sample shape, classes and input scaling."""
    shape = datasets.DataShape(
        train_set.sample_shape, train_set.num_classes, train_set.input_kind, len(train_set)
    )
    return model_config(spec, shape)


def _train(
    spec: RunCreate, callbacks: DatabaseCallbacks, start_state: bytes | None
) -> tuple[training.TrainResult, ModelConfig]:
    train_set, val_set, config = _load_data(spec, callbacks)
    state = resume.load_training_state(start_state) if start_state else None
    if state is not None:
        log.info("run %s resumes after epoch %d", callbacks.lease.run_id, state.epoch)
    tcfg = train_config(spec)
    device = training.resolve_device(get_settings().device)
    if tcfg.processes > 1:  # data-parallel processes: gloo on the CPU, NCCL across GPUs
        result = distributed.train_distributed(
            config, tcfg, train_set, val_set, callbacks, resume=state, device=device
        )
        return result, config
    if device.type == "cpu":
        callbacks.cores = CoreShare.for_run(callbacks.lease.worker, config, tcfg)
        # Sized now rather than at the first stop check, half a second in: the initial probes and
        # those first steps of a lone run get the idle cores too.
        with session_scope(read_only=True) as session:
            callbacks.cores.resize(session)
    result = training.train(config, tcfg, train_set, val_set, callbacks, resume=state, device=device)
    return result, config


def _succeed(lease: run_repo.Lease, config: ModelConfig, weights: bytes) -> RunStatus | None:
    with session_scope() as session:
        if not run_repo.finish_held_run(session=session, lease=lease, status=RunStatus.succeeded):
            log.warning("run %s: lease lost before the model was stored; discarding it", lease.run_id)
            return None
        run_repo.save_artifact(
            session=session,
            run_id=lease.run_id,
            weights=weights,
            model_config=config.to_dict(),
            sha256=checkpoints.sha256_hex(weights),
        )
    log.info("run %s succeeded", lease.run_id)
    return RunStatus.succeeded


def _stop(lease: run_repo.Lease, reason: StopReason) -> RunStatus | None:
    if reason is StopReason.cancelled:
        return _end(lease, RunStatus.cancelled)
    if reason is StopReason.released:
        # Not published from here: this node is shutting down and could receive it again. The
        # reaper of any other worker (or of this one, restarted) publishes it on its next pass.
        with session_scope() as session:
            if run_repo.release_held_run(session=session, lease=lease):
                log.info("run %s handed back to the queue at shutdown", lease.run_id)
        return None
    with session_scope() as session:
        deleted = run_repo.get_run(session=session, run_id=lease.run_id) is None
    if deleted:  # DELETE /api/v1/runs/{id} while it trained: nothing of it is written any more
        log.info("run %s was deleted while it trained; this attempt stops", lease.run_id)
        return None
    log.warning("run %s: lease lost (reaped or re-delivered); this attempt stops", lease.run_id)
    return None


def _end(lease: run_repo.Lease, status: RunStatus, error: str | None = None) -> RunStatus | None:
    with session_scope() as session:
        ended = run_repo.finish_held_run(session=session, lease=lease, status=status, error=error)
    if not ended:
        log.warning("run %s: lease lost; not recording %s", lease.run_id, status.value)
        return None
    log.info("run %s ended %s", lease.run_id, status.value)
    return status
