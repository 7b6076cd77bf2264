"""A run whose loss becomes NaN or infinite: the loop reports that epoch and stops there, on either
step strategy, and a finite run is never taken for a diverged one."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from service.ml import training
from service.ml.config import ModelConfig, NormConfig, TrainConfig
from service.ml.datasets import ImageDataset, make_synthetic, train_val_split
from service.ml.training import EpochMetrics, Snapshot, train

NO_NORM = ModelConfig(hidden=(64, 64), norm=NormConfig(kind="none"))
# SGD at a learning rate of a million: the first steps overflow the weights.
EXPLODES = TrainConfig(epochs=4, optimizer="sgd", lr=1e6, momentum=0.0, seed=1, probes=())


class Recorder:
    def __init__(self) -> None:
        self.epochs: list[EpochMetrics] = []

    def on_epoch_end(self, metrics: EpochMetrics, snapshot: Snapshot) -> None:
        self.epochs.append(metrics)

    def should_stop(self) -> bool:
        return False


@pytest.fixture(scope="module")
def small() -> tuple[ImageDataset, ImageDataset]:
    return train_val_split(make_synthetic(320, seed=5), 0.25)


@pytest.mark.parametrize("autograd", [False, True], ids=["fast_path", "autograd"])
def test_a_diverging_run_reports_its_epoch_and_stops_there(
    small: tuple[ImageDataset, ImageDataset], autograd: bool
) -> None:
    # AGC with an enormous λ clips nothing but takes the autograd step instead of the compiled one.
    tcfg = replace(EXPLODES, agc=1e9 if autograd else None)
    assert training.needs_autograd(tcfg) is autograd
    assert training.trains_fast(NO_NORM)
    recorder = Recorder()
    result = train(NO_NORM, tcfg, *small, recorder)
    assert result.diverged_at == 1
    assert [m.epoch for m in recorder.epochs] == [1]  # reported, then nothing more trained
    assert result.epochs == recorder.epochs
    last = recorder.epochs[-1]
    assert last.diverged
    assert not (math.isfinite(last.train_loss) and math.isfinite(last.val_loss))
    assert not result.cancelled


def test_a_finite_run_does_not_diverge(small: tuple[ImageDataset, ImageDataset]) -> None:
    result = train(NO_NORM, TrainConfig(epochs=2, probes=()), *small)
    assert result.diverged_at is None
    assert [m.epoch for m in result.epochs] == [1, 2]
