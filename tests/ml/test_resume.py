"""Resuming from an epoch-boundary training state gives the run it would have been uninterrupted."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from service.ml.config import ModelConfig, NormConfig, TrainConfig
from service.ml.datasets import make_synthetic, train_val_split
from service.ml.resume import ResumeError, encode_training_state, load_training_state
from service.ml.training import train
from tests.ml.test_training import Recorder, without_time


@pytest.mark.parametrize(("norm", "optimizer"), [("batch", "adam"), ("none", "adam"), ("batch", "sgd")])
def test_resume_after_epoch_one_equals_an_uninterrupted_run(norm: str, optimizer: str) -> None:
    cfg = ModelConfig(hidden=(32,), norm=NormConfig(kind=norm))  # type: ignore[arg-type]
    data = train_val_split(make_synthetic(400, seed=2), 0.25)
    three = TrainConfig(epochs=3, seed=4, optimizer=optimizer)  # type: ignore[arg-type]
    straight = Recorder()
    whole = train(cfg, three, *data, callbacks=straight)

    first = Recorder()
    train(cfg, TrainConfig(epochs=1, seed=4, optimizer=optimizer), *data, callbacks=first)  # type: ignore[arg-type]
    state = load_training_state(first.snapshots[0])
    assert state.epoch == 1
    rest = Recorder()
    resumed = train(cfg, three, *data, callbacks=rest, resume=state)

    assert [m.epoch for m in rest.epochs] == [2, 3]
    assert [without_time(m) for m in rest.epochs] == [without_time(m) for m in straight.epochs[1:]]
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_state_for_another_architecture_is_refused() -> None:
    data = train_val_split(make_synthetic(200, seed=1), 0.25)
    recorder = Recorder()
    train(ModelConfig(hidden=(32,)), TrainConfig(epochs=1), *data, callbacks=recorder)
    state = load_training_state(recorder.snapshots[0])
    with pytest.raises(ResumeError):
        train(ModelConfig(hidden=(16,)), TrainConfig(epochs=2), *data, resume=state)


def test_garbage_is_a_resume_error() -> None:
    with pytest.raises(ResumeError):
        load_training_state(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")


# Renorm's schedule runs on its step buffer and BLN keeps per-epoch sums: both must survive a resume,
# as must a learning-rate schedule (a function of the epoch, no state of its own).
RESUMABLE = [
    (
        NormConfig(kind="batch_renorm", renorm_warmup_steps=4, renorm_rmax_steps=14, renorm_dmax_steps=9),
        "sgd",
    ),
    (NormConfig(kind="ghost", virtual_batch_size=8), "adam"),
    (NormConfig(kind="batch_layer", bln_batch_size=32), "adam"),
]


@pytest.mark.parametrize(("norm", "optimizer"), RESUMABLE, ids=lambda v: getattr(v, "kind", v))
def test_resume_with_stateful_norms_and_a_schedule_is_bit_identical(norm: NormConfig, optimizer: str) -> None:
    for arch in ("mlp", "cnn"):
        cfg = ModelConfig(arch=arch, hidden=(32,), channels=(4,), norm=norm)  # type: ignore[arg-type]
        data = train_val_split(make_synthetic(400, seed=2), 0.25)
        three = TrainConfig(epochs=3, seed=4, optimizer=optimizer, schedule="step", step_size=1, gamma=0.5)  # type: ignore[arg-type]
        straight = Recorder()
        whole = train(cfg, three, *data, callbacks=straight)
        first = Recorder()
        train(cfg, replace(three, epochs=1), *data, callbacks=first)
        rest = Recorder()
        resumed = train(cfg, three, *data, callbacks=rest, resume=load_training_state(first.snapshots[0]))
        assert [without_time(m) for m in rest.epochs] == [without_time(m) for m in straight.epochs[1:]]
        a, b = whole.model.state_dict(), resumed.model.state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_decoded_state_encodes_to_bytes_that_decode_to_it_again() -> None:
    # The data-parallel launcher hands a decoded resume state to its ranks this way.
    data = train_val_split(make_synthetic(200, seed=1), 0.25)
    for optimizer in ("adam", "sgd"):
        recorder = Recorder()
        train(ModelConfig(hidden=(8,)), TrainConfig(epochs=1, optimizer=optimizer), *data, callbacks=recorder)
        state = load_training_state(recorder.snapshots[0])
        again = load_training_state(encode_training_state(state))
        assert again.epoch == state.epoch == 1
        assert again.model_state.keys() == state.model_state.keys()
        assert all(torch.equal(again.model_state[k], v) for k, v in state.model_state.items())
        assert again.optimizer_state["param_groups"] == state.optimizer_state["param_groups"]
        for index, entry in state.optimizer_state["state"].items():
            got = again.optimizer_state["state"][index]
            assert got.keys() == entry.keys()
            assert all(torch.equal(got[k], v) for k, v in entry.items()), (optimizer, index)


def test_a_resumed_cnn_with_adam_is_bit_identical_in_channels_last_layout() -> None:
    """A cnn trains in channels-last layout (training.to_channels_last); a resumed run's Adam moments,
    stored contiguous, follow their parameters' layout, without which fused Adam misreads them."""
    cfg = ModelConfig(arch="cnn", channels=(4, 8), norm=NormConfig(kind="batch"))
    data = train_val_split(make_synthetic(200, seed=2), 0.25)
    two = TrainConfig(epochs=2, seed=4, optimizer="adam")
    straight = Recorder()
    whole = train(cfg, two, *data, callbacks=straight)
    assert whole.model.get_submodule("conv2").weight.is_contiguous(memory_format=torch.channels_last)
    first = Recorder()
    train(cfg, replace(two, epochs=1), *data, callbacks=first)
    rest = Recorder()
    resumed = train(cfg, two, *data, callbacks=rest, resume=load_training_state(first.snapshots[0]))
    assert [without_time(m) for m in rest.epochs] == [without_time(m) for m in straight.epochs[1:]]
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
