"""Runs trained as one stacked model give, run by run, exactly what they give trained alone."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest
import torch

from service.ml import stacked, training
from service.ml.config import ModelConfig, NormConfig, TrainConfig
from service.ml.datasets import ImageDataset, make_synthetic, to_inputs, train_val_split
from service.ml.resume import load_training_state
from tests.ml.test_training import Recorder, without_time

Data = tuple[ImageDataset, ImageDataset]
SEEDS = (0, 1, 5)  # three members: the third is the one whose stacked layout once rounded differently

# Every configuration can_stack accepts, across what the stacked kernels compute differently.
STACKABLE = {
    "article": (ModelConfig(), TrainConfig(epochs=2)),
    "no-norm-odd-widths": (ModelConfig(hidden=(37, 20), norm=NormConfig(kind="none")), TrainConfig(epochs=2)),
    "two-layers-odd-batch": (ModelConfig(hidden=(48, 32)), TrainConfig(epochs=2, batch_size=13)),
    "before-activation-cumulative": (
        ModelConfig(norm=NormConfig(position="before_activation", momentum=None)),
        TrainConfig(epochs=2, batch_size=7),
    ),
    "no-affine-no-running-stats": (
        ModelConfig(hidden=(16,), norm=NormConfig(affine=False, track_running_stats=False)),
        TrainConfig(epochs=2, batch_size=50),
    ),
    "gamma-only": (ModelConfig(hidden=(32,), norm=NormConfig(center=False)), TrainConfig(epochs=2)),
    "adam-weight-decay-cosine": (
        ModelConfig(hidden=(64,)),
        TrainConfig(epochs=2, weight_decay=1e-3, schedule="cosine"),
    ),
    "sgd-momentum-weight-decay": (
        ModelConfig(),
        TrainConfig(epochs=2, optimizer="sgd", lr=0.05, weight_decay=1e-3),
    ),
    "sgd-plain": (
        ModelConfig(norm=NormConfig(kind="none")),
        TrainConfig(epochs=2, optimizer="sgd", momentum=0.0),
    ),
}


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    # As the worker's training processes under `make run`: stacking is exact on one thread only.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data() -> Data:
    # 488 training samples: partial last batches at every batch size above (and one of 1 at 13: dropped).
    return train_val_split(make_synthetic(611, seed=4), 0.2)


def seeded(tcfg: TrainConfig, seeds: tuple[int, ...] = SEEDS) -> list[TrainConfig]:
    return [dataclasses.replace(tcfg, seed=seed) for seed in seeds]


def assert_same_run(got: training.TrainResult, expected: training.TrainResult) -> None:
    assert [without_time(m) for m in got.epochs] == [without_time(m) for m in expected.epochs]
    assert [m.layer_stats for m in got.epochs] == [m.layer_stats for m in expected.epochs]
    assert got.dropped_last_batch == expected.dropped_last_batch
    want = expected.model.state_dict()
    for key, value in got.model.state_dict().items():
        assert torch.equal(value, want[key]), key


@pytest.mark.parametrize(("cfg", "tcfg"), STACKABLE.values(), ids=STACKABLE.keys())
def test_each_stacked_run_is_the_run_alone_bit_for_bit(
    cfg: ModelConfig, tcfg: TrainConfig, data: Data
) -> None:
    assert stacked.can_stack(cfg, tcfg)
    tcfgs = seeded(tcfg)
    recorders = [Recorder() for _ in tcfgs]
    results = stacked.train_stacked(cfg, tcfgs, *data, recorders)
    for one, result, recorder in zip(tcfgs, results, recorders, strict=True):
        alone_recorder = Recorder()
        alone = training.train(cfg, one, *data, callbacks=alone_recorder)
        assert_same_run(result, alone)
        assert [without_time(m) for m in recorder.epochs] == [without_time(m) for m in alone_recorder.epochs]
        assert not result.cancelled


def test_the_comparison_can_fail(data: Data) -> None:
    # Not vacuous: the members differ from one another, and from a run with another learning rate.
    cfg, tcfg = STACKABLE["article"]
    first, second = stacked.train_stacked(cfg, seeded(tcfg, (0, 1)), *data, [Recorder(), Recorder()])
    assert not torch.equal(first.model.fc1.weight, second.model.fc1.weight)
    other = training.train(cfg, dataclasses.replace(tcfg, lr=1.001e-3), *data)
    assert not torch.equal(first.model.fc1.weight, other.model.fc1.weight)


def test_a_stacked_run_checkpoints_a_state_that_resumes_alone(data: Data) -> None:
    cfg, three = ModelConfig(hidden=(32,)), TrainConfig(epochs=3)
    recorders = [Recorder() for _ in SEEDS]
    results = stacked.train_stacked(cfg, seeded(three), *data, recorders)
    # The third member's state after epoch 1, resumed by the ordinary loop, ends where the stack did.
    resumed = training.train(
        cfg, seeded(three)[2], *data, resume=load_training_state(recorders[2].snapshots[0])
    )
    for key, value in results[2].model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key


def test_a_member_that_stops_leaves_and_the_others_train_on_unchanged(
    data: Data, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(training, "STOP_CHECK_INTERVAL_S", 0.0)  # ask should_stop before every call
    # 128 rows per call of the compiled loop (32 steps of 4): four calls an epoch, a question before each.
    cfg, tcfg = ModelConfig(hidden=(32,)), TrainConfig(epochs=2, batch_size=4)
    # The middle member stops on its 3rd question: mid-epoch 1, after 64 of its steps.
    recorders = [Recorder(), Recorder(stop_at=3), Recorder()]
    left: list[tuple[int, training.TrainResult]] = []
    results = stacked.train_stacked(cfg, seeded(tcfg), *data, recorders, lambda k, r: left.append((k, r)))
    assert recorders[1].stop_calls == 3
    assert [(k, r.cancelled) for k, r in left] == [(1, True)]
    assert results[1].cancelled
    assert (results[1].epochs, recorders[1].epochs) == ([], [])
    for k in (0, 2):
        assert not results[k].cancelled
        assert_same_run(results[k], training.train(cfg, seeded(tcfg)[k], *data))


def test_members_that_stop_at_an_epoch_end_leave_and_the_last_one_ends_the_stack(data: Data) -> None:
    cfg, tcfg = ModelConfig(hidden=(16,)), TrainConfig(epochs=3)
    # Short epochs: should_stop is asked once per epoch end. Member 0 stops after epoch 1, member 1
    # after epoch 2: the stack ends then, without a third epoch.
    recorders = [Recorder(stop_at=1), Recorder(stop_at=2)]
    left: list[int] = []
    results = stacked.train_stacked(cfg, seeded(tcfg, (3, 4)), *data, recorders, lambda k, r: left.append(k))
    assert left == [0, 1]
    assert [len(r.epochs) for r in results] == [1, 2]
    assert all(r.cancelled for r in results)
    alone = training.train(cfg, seeded(tcfg, (3, 4))[1], *data, callbacks=Recorder(stop_at=2))
    assert_same_run(results[1], alone)


UNSTACKABLE = {
    "tanh": (ModelConfig(activation="tanh"), TrainConfig()),
    "sigmoid": (ModelConfig(activation="sigmoid"), TrainConfig()),
    "batch-norm-width-not-a-multiple-of-16": (ModelConfig(hidden=(37,)), TrainConfig()),
    "layer-norm": (ModelConfig(norm=NormConfig(kind="layer")), TrainConfig()),
    "dropout": (ModelConfig(dropout=0.1), TrainConfig()),
    "cnn": (ModelConfig(arch="cnn", channels=(4,)), TrainConfig()),
    "data-parallel": (ModelConfig(), TrainConfig(processes=2)),
}


@pytest.mark.parametrize(("cfg", "tcfg"), UNSTACKABLE.values(), ids=UNSTACKABLE.keys())
def test_what_would_not_be_exact_trains_alone(cfg: ModelConfig, tcfg: TrainConfig) -> None:
    assert not stacked.can_stack(cfg, tcfg)


def test_a_process_with_more_than_one_thread_trains_runs_alone(data: Data) -> None:
    assert stacked.can_stack(ModelConfig(), TrainConfig())
    torch.set_num_threads(2)
    assert not stacked.can_stack(ModelConfig(), TrainConfig())
    # Why: on two threads the kernels split a stack's work otherwise than a run's alone.
    tcfgs = seeded(TrainConfig(epochs=1))
    models = [training.build_model(ModelConfig(), t.seed) for t in tcfgs]
    optimizers = [training.make_optimizer(m, t) for m, t in zip(models, tcfgs, strict=True)]
    stack = stacked.StackedMlp(list(zip(models, optimizers, strict=True)))
    train_set = data[0]
    orders = torch.stack([training.epoch_permutation(len(train_set), t.seed, 1) for t in tcfgs])
    stack.run(
        stacked.StackedBatches.for_epoch(to_inputs(train_set.x).flatten(1), train_set.y, orders, 32),
        0,
        len(train_set),
    )
    alone = [training.train(ModelConfig(), t, *data).model for t in tcfgs]
    assert any(not torch.equal(m.fc1.weight, a.fc1.weight) for m, a in zip(models, alone, strict=True))


def one_epoch_of_steps_matches_alone(cfg: ModelConfig, data: Data) -> bool:
    """Whether one epoch of stacked steps (StackedMlp, bypassing can_stack) leaves every member's
    weights exactly where a run alone ends its first epoch."""
    train_set, _ = data
    tcfgs = seeded(TrainConfig(epochs=1, batch_size=13))
    members = [training.build_model(cfg, t.seed) for t in tcfgs]
    optimizers = [training.make_optimizer(m, t) for m, t in zip(members, tcfgs, strict=True)]
    stack = stacked.StackedMlp(list(zip(members, optimizers, strict=True)))
    n = len(train_set)
    n_used = n - 1 if n % 13 == 1 else n  # as train() uses the epoch
    orders = torch.stack([training.epoch_permutation(n, t.seed, 1)[:n_used] for t in tcfgs])
    x = to_inputs(train_set.x).flatten(1)
    stack.run(stacked.StackedBatches.for_epoch(x, train_set.y, orders, 13), 0, n_used)
    alone = [training.train(cfg, t, *data).model for t in tcfgs]
    return all(
        torch.equal(p, q)
        for m, a in zip(members, alone, strict=True)
        for p, q in zip(m.parameters(), a.parameters(), strict=True)
    )


def test_why_tanh_and_odd_batch_norm_widths_train_alone(data: Data) -> None:
    # The rule above is measured, not assumed: stacked, these round differently from alone, while the
    # same harness finds ReLU with widths of 16s exact.
    assert one_epoch_of_steps_matches_alone(ModelConfig(hidden=(48, 32)), data)
    assert not one_epoch_of_steps_matches_alone(ModelConfig(hidden=(48, 32), activation="tanh"), data)
    assert not one_epoch_of_steps_matches_alone(ModelConfig(hidden=(37, 20)), data)


def test_a_stack_refuses_configs_that_differ_beyond_the_seed(data: Data) -> None:
    cfg = ModelConfig()
    with pytest.raises(ValueError, match="equal training configs but for the seed"):
        stacked.train_stacked(
            cfg, [TrainConfig(lr=1e-3), TrainConfig(lr=2e-3, seed=1)], *data, [Recorder()] * 2
        )
    with pytest.raises(ValueError, match="cannot train stacked"):
        stacked.train_stacked(ModelConfig(activation="tanh"), seeded(TrainConfig()), *data, [Recorder()] * 3)
