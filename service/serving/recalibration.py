"""PreciseBN for a stored run: recompute its BN statistics over training batches, store a new version.

It runs in the API process, synchronously, in a request thread. That is bounded work: at most the
run's training split once through the MLP in train mode (48,000 Fashion-MNIST samples take well
under a second on one core) plus two validation passes, and one recalibration at a time per process
(a second one gets RecalibrationBusy, answered 503 with Retry-After). A Celery task would need a
task in `workers/` and a job resource to poll, for work that ends in about the time of one request.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import torch
from sqlalchemy.exc import IntegrityError

from service.datasets.loading import load_training_data
from service.db import session_scope
from service.ml import bn_tools, checkpoints, training
from service.ml.datasets import ImageDataset, to_inputs
from service.models import Recalibration
from service.runs import repository as run_repo
from service.runs.schemas import RunCreate
from service.serving import repository as model_repo
from service.serving.schemas import RecalibrateRequest
from service.serving.server import LoadedModel

_LOCK = threading.Lock()
VERSION_RACE_RETRIES = 3


class RecalibrationBusy(RuntimeError):
    """Another recalibration is running in this process."""


class NothingToRecalibrate(ValueError):
    """The model has no BN layer with running statistics."""


class TooFewSamples(ValueError):
    """The run's training split cannot supply the batches asked for."""


def _batches(
    train_set: ImageDataset, *, num_batches: int, batch_size: int, seed: int
) -> Iterator[torch.Tensor]:
    needed = num_batches * batch_size
    if needed > len(train_set):
        raise TooFewSamples(
            f"{num_batches} batches of {batch_size} need {needed} samples; the run's training split has "
            f"{len(train_set)}"
        )
    # Epoch 0 of the seed's order: the training loop's own shuffling, never used by training (1-based).
    order = training.epoch_permutation(len(train_set), seed, 0)[:needed]
    for start in range(0, needed, batch_size):
        yield to_inputs(train_set.x[order[start : start + batch_size]])


def recalibrate_run(*, run_id: str, loaded: LoadedModel, request: RecalibrateRequest) -> Recalibration:
    """Recalibrate the loaded version of `run_id`'s model, store the result as the run's next version
    and return its Recalibration row (with `version` set). The database is read and written in short
    transactions before and after the computation, never held during it."""
    if not bn_tools.batch_norm_layers(loaded.unfused):
        raise NothingToRecalibrate(f"run {run_id}'s model has no BatchNorm layer to recalibrate")
    with session_scope() as session:
        spec = RunCreate.model_validate(run_repo.get_run_spec(session=session, run_id=run_id))
    if not _LOCK.acquire(blocking=False):
        raise RecalibrationBusy("another recalibration is running in this process; retry shortly")
    try:
        started = time.monotonic()
        train_set, val_set = load_training_data(spec)
        batch_size = request.batch_size or spec.train.batch_size
        batches = _batches(
            train_set, num_batches=request.num_batches, batch_size=batch_size, seed=request.seed
        )
        try:
            result = bn_tools.recalibrate(loaded.unfused, batches, request.estimator)
        except TooFewSamples:
            raise
        except ValueError as exc:  # no running statistics (track_running_stats=false)
            raise NothingToRecalibrate(str(exc)) from exc
        loss_before, accuracy_before = training.evaluate(loaded.unfused, val_set)
        loss_after, accuracy_after = training.evaluate(result.model, val_set)
        weights = checkpoints.save_checkpoint(result.model, loaded.config)
        seconds = time.monotonic() - started
    finally:
        _LOCK.release()
    for attempt in range(VERSION_RACE_RETRIES):
        row = Recalibration(
            base_version=loaded.version,
            estimator=request.estimator,
            num_batches=result.batches,
            batch_size=batch_size,
            samples=result.samples,
            val_loss_before=loss_before,
            val_accuracy_before=accuracy_before,
            val_loss_after=loss_after,
            val_accuracy_after=accuracy_after,
            seconds=seconds,
        )
        try:
            with session_scope() as session:
                model_repo.save_recalibrated_version(
                    session=session,
                    run_id=run_id,
                    weights=weights,
                    model_config=loaded.config.to_dict(),
                    sha256=checkpoints.sha256_hex(weights),
                    recalibration=row,
                )
            return row
        except IntegrityError:  # another process stored the same version number first: take the next
            if attempt == VERSION_RACE_RETRIES - 1:
                raise
    raise AssertionError("unreachable")
