"""Execute one training run: the domain function behind the Celery task.

The task passes a run id; this module reloads the run, trains it with callbacks that write each
epoch's metrics to the database and read the cancel flag, and records the outcome. Weights and the
final status are written in one transaction, so a run is never `succeeded` without its artifact.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from service import crud
from service.config import get_settings
from service.db import session_scope
from service.ml import checkpoints, datasets, training
from service.models import RunStatus
from service.schemas import RunCreate

log = logging.getLogger(__name__)


@dataclass
class DatabaseCallbacks:
    """Reports a run's progress to the database and reads its cancel flag."""

    run_id: str

    def on_epoch_end(self, metrics: training.EpochMetrics) -> None:
        with session_scope() as session:
            crud.record_epoch(
                session=session,
                run_id=self.run_id,
                epoch=metrics.epoch,
                train_loss=metrics.train_loss,
                train_accuracy=metrics.train_accuracy,
                val_loss=metrics.val_loss,
                val_accuracy=metrics.val_accuracy,
                seconds=metrics.seconds,
            )
        log.info("run %s epoch %d: val_accuracy=%.4f", self.run_id, metrics.epoch, metrics.val_accuracy)

    def should_stop(self) -> bool:
        with session_scope() as session:
            return crud.is_cancel_requested(session=session, run_id=self.run_id)


def dataset_search_dirs() -> list[Path]:
    return [get_settings().data_dir, datasets.SYSTEM_DATASET_DIR]


def load_training_data(spec: RunCreate) -> tuple[datasets.ImageDataset, datasets.ImageDataset]:
    full = datasets.load_dataset(
        spec.dataset.name, search_dirs=dataset_search_dirs(), split="train", limit=spec.dataset.limit
    )
    return datasets.train_val_split(full, spec.dataset.val_split)


def describe_error(exc: BaseException) -> str:
    # Dataset and checkpoint errors are written for users; anything else keeps its type for debugging.
    if isinstance(exc, datasets.DatasetError | checkpoints.CheckpointError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def execute_run(run_id: str, *, worker: str) -> RunStatus | None:
    """Train run `run_id` to its end. Returns the final status, or None if the run was not queued."""
    with session_scope() as session:
        if not crud.claim_run(session=session, run_id=run_id, worker=worker):
            log.info("run %s is not queued (cancelled or taken); skipping this delivery", run_id)
            return None
        spec = RunCreate.model_validate(crud.get_run_spec(session=session, run_id=run_id))
    log.info("run %s started on %s", run_id, worker)
    try:
        train_set, val_set = load_training_data(spec)
        model_config = spec.model_config_for_ml()
        result = training.train(
            model_config, spec.train_config_for_ml(), train_set, val_set, DatabaseCallbacks(run_id)
        )
        if result.cancelled:
            return _finish(run_id, RunStatus.cancelled)
        weights = checkpoints.save_checkpoint(result.model, model_config)
    except Exception as exc:
        log.exception("run %s failed", run_id)
        return _finish(run_id, RunStatus.failed, describe_error(exc))
    with session_scope() as session:
        crud.save_artifact(
            session=session,
            run_id=run_id,
            weights=weights,
            model_config=model_config.to_dict(),
            sha256=checkpoints.sha256_hex(weights),
        )
        crud.finish_run(session=session, run_id=run_id, status=RunStatus.succeeded)
    log.info("run %s succeeded", run_id)
    return RunStatus.succeeded


def _finish(run_id: str, status: RunStatus, error: str | None = None) -> RunStatus:
    with session_scope() as session:
        crud.finish_run(session=session, run_id=run_id, status=status, error=error)
    log.info("run %s ended %s", run_id, status.value)
    return status


def queued_run_ids() -> list[str]:
    with session_scope() as session:
        runs, _ = crud.list_runs(session=session, status=RunStatus.queued, limit=10_000, offset=0)
        return [run.id for run in runs]
