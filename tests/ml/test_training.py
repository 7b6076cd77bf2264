"""The training loop on small synthetic sets: determinism, batching, cancellation, learning, modes."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from torch import nn

from service.ml import training
from service.ml.config import ModelConfig, NormConfig, TrainConfig
from service.ml.datasets import ImageDataset, make_synthetic, to_inputs, train_val_split
from service.ml.training import EpochMetrics, Snapshot, epoch_permutation, evaluate, predict_proba, train

BN = ModelConfig()
NO_BN = ModelConfig(norm=NormConfig(kind="none"))


class Recorder:
    """Records epochs; asks to stop on the `stop_at`-th call of should_stop (never if None)."""

    def __init__(self, stop_at: int | None = None) -> None:
        self.epochs: list[EpochMetrics] = []
        self.snapshots: list[bytes] = []
        self.stop_calls = 0
        self.stop_at = stop_at

    def on_epoch_end(self, metrics: EpochMetrics, snapshot: Snapshot) -> None:
        self.epochs.append(metrics)
        self.snapshots.append(snapshot())

    def should_stop(self) -> bool:
        self.stop_calls += 1
        return self.stop_at is not None and self.stop_calls >= self.stop_at


@pytest.fixture(scope="module")
def small() -> tuple[ImageDataset, ImageDataset]:
    return train_val_split(make_synthetic(320, seed=5), 0.25)


def without_time(m: EpochMetrics) -> tuple[float, ...]:
    return (m.epoch, m.train_loss, m.train_accuracy, m.val_loss, m.val_accuracy)


def test_same_seed_gives_identical_weights_and_metrics(small: tuple[ImageDataset, ImageDataset]) -> None:
    runs = [train(BN, TrainConfig(epochs=1, seed=s), *small) for s in (7, 7, 8)]
    a, b, c = (r.model.state_dict() for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert without_time(runs[0].epochs[0]) == without_time(runs[1].epochs[0])
    assert not torch.equal(a["fc1.weight"], c["fc1.weight"])  # the seed does matter


def test_epoch_order_depends_on_seed_and_epoch_only() -> None:
    assert torch.equal(epoch_permutation(100, 3, 1), epoch_permutation(100, 3, 1))
    assert not torch.equal(epoch_permutation(100, 3, 1), epoch_permutation(100, 3, 2))
    assert not torch.equal(epoch_permutation(100, 3, 1), epoch_permutation(100, 4, 1))
    assert sorted(epoch_permutation(100, 3, 1).tolist()) == list(range(100))


def test_train_does_not_disturb_the_global_rng(small: tuple[ImageDataset, ImageDataset]) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train(NO_BN, TrainConfig(epochs=1), *small)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize(("n", "dropped"), [(33, True), (34, False), (64, False)])
def test_final_batch_of_one_is_dropped(n: int, dropped: bool) -> None:
    data = make_synthetic(n + 10, seed=1)
    train_set, val_set = data.take(slice(0, n)), data.take(slice(n, None))
    result = train(BN, TrainConfig(epochs=1, batch_size=32), train_set, val_set)
    assert result.dropped_last_batch is dropped
    assert len(result.epochs) == 1


@pytest.mark.parametrize(
    ("n", "processes", "used"), [(33, 1, 32), (34, 1, 34), (64, 1, 64), (35, 2, 32), (36, 2, 36)]
)
def test_a_final_batch_is_dropped_when_a_shard_of_it_would_hold_one_sample(
    n: int, processes: int, used: int
) -> None:
    assert training.used_samples(n, 32, processes) == used


def test_shards_cut_each_batch_as_tensor_split_does() -> None:
    for world in (1, 2, 3, 5):
        for length in range(world, 40):
            parts = torch.arange(10, 10 + length).tensor_split(world)
            for rank, part in enumerate(parts):
                shard = training.Shard(rank, world)
                assert shard.bounds(10, 10 + length) == (int(part[0]), int(part[-1]) + 1)
                assert shard.loss_weight(10, 10 + length) == world * len(part) / length


def test_batch_size_one_with_bn_is_refused(small: tuple[ImageDataset, ImageDataset]) -> None:
    with pytest.raises(ValueError, match="batch_size 1"):
        train(BN, TrainConfig(epochs=1, batch_size=1), *small)


def test_callbacks_see_every_epoch(small: tuple[ImageDataset, ImageDataset]) -> None:
    recorder = Recorder()
    result = train(NO_BN, TrainConfig(epochs=3), *small, callbacks=recorder)
    assert [m.epoch for m in recorder.epochs] == [1, 2, 3]
    assert recorder.epochs == result.epochs
    assert not result.cancelled
    m = result.epochs[-1]
    assert all(
        type(v) is float for v in (m.train_loss, m.train_accuracy, m.val_loss, m.val_accuracy, m.seconds)
    )
    # The training steps' own seconds: part of the epoch's, which validation follows.
    assert all(e.train_seconds is not None and 0 < e.train_seconds < e.seconds for e in result.epochs)
    # Asked once per epoch end except after the last; the 0.5 s throttle keeps it off the steps.
    assert recorder.stop_calls <= 2 + sum(e.seconds for e in result.epochs) / training.STOP_CHECK_INTERVAL_S


def test_stop_at_an_epoch_end(small: tuple[ImageDataset, ImageDataset]) -> None:
    recorder = Recorder(stop_at=1)
    result = train(NO_BN, TrainConfig(epochs=5), *small, callbacks=recorder)
    assert result.cancelled
    assert [m.epoch for m in result.epochs] == [1]


def test_stop_mid_epoch_drops_that_epoch(
    small: tuple[ImageDataset, ImageDataset], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(training, "STOP_CHECK_INTERVAL_S", 0.0)  # ask before every step
    monkeypatch.setattr(training, "USE_FAST_PATH", False)  # autograd: one step a call
    recorder = Recorder(stop_at=3)
    result = train(BN, TrainConfig(epochs=2), *small, callbacks=recorder)
    assert result.cancelled
    assert result.epochs == []
    assert recorder.epochs == []
    assert recorder.stop_calls == 3


@pytest.mark.parametrize("cfg", [BN, NO_BN], ids=["bn", "no-bn"])
def test_both_configurations_learn(cfg: ModelConfig) -> None:
    train_set, val_set = train_val_split(make_synthetic(2000, seed=0), 0.2)
    result = train(cfg, TrainConfig(epochs=2, seed=0), train_set, val_set)
    first, last = result.epochs
    assert last.val_accuracy > 0.5  # chance is 0.1
    assert last.train_loss < first.train_loss


def test_sgd_optimizer_trains(small: tuple[ImageDataset, ImageDataset]) -> None:
    result = train(NO_BN, TrainConfig(epochs=2, optimizer="sgd", lr=0.05), *small)
    assert result.epochs[-1].train_loss < result.epochs[0].train_loss


def bn_model_after_training(small: tuple[ImageDataset, ImageDataset]) -> nn.Module:
    model = train(BN, TrainConfig(epochs=1), *small).model
    model.train()  # as if a caller forgot: evaluate/predict_proba must switch modes themselves
    return model


def test_evaluate_sets_eval_mode_and_ignores_batching(small: tuple[ImageDataset, ImageDataset]) -> None:
    model = bn_model_after_training(small)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss, accuracy = evaluate(model, small[1])
    assert not model.training
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    loss7, accuracy7 = evaluate(model, small[1], batch_size=7)
    assert accuracy7 == accuracy
    assert loss7 == pytest.approx(loss, abs=1e-6)


def test_predict_proba(small: tuple[ImageDataset, ImageDataset]) -> None:
    model = bn_model_after_training(small)
    inputs = to_inputs(small[1].x[:16])
    probs = predict_proba(model, inputs)
    assert not model.training
    assert probs.shape == (16, 10)
    torch.testing.assert_close(probs.sum(1), torch.ones(16))
    torch.testing.assert_close(predict_proba(model, inputs.flatten(1)), probs)
    torch.testing.assert_close(predict_proba(model, inputs[3:4]), probs[3:4], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="784 values per sample"):
        predict_proba(model, torch.rand(2, 100))


# ------------------------------------------------------------------ every normaliser, both architectures

KINDS = ("none", "batch", "layer", "group", "instance", "batch_renorm", "ghost", "weight", "batch_layer")
SMOKE = [
    ModelConfig(
        arch=arch,
        hidden=(32,),
        channels=(4, 8),
        dropout=0.1,
        norm=NormConfig(
            kind=kind,
            num_groups=4,
            virtual_batch_size=8,
            bln_batch_size=16,
            renorm_warmup_steps=2,
            renorm_rmax_steps=6,
            renorm_dmax_steps=4,
        ),
    )
    for arch in ("mlp", "cnn")
    for kind in KINDS
    if not (arch == "mlp" and kind == "instance")
]


@pytest.mark.parametrize("cfg", SMOKE, ids=lambda c: f"{c.arch}-{c.norm.kind}")
def test_every_kind_trains_and_evaluates_each_sample_independently_of_its_batch(
    cfg: ModelConfig, small: tuple[ImageDataset, ImageDataset]
) -> None:
    result = train(cfg, TrainConfig(epochs=1, batch_size=16, seed=1), *small)
    (metrics,) = result.epochs
    assert math.isfinite(metrics.train_loss)
    assert math.isfinite(metrics.val_loss)
    # Every kind's eval (with running statistics where it has them) sees one sample at a time.
    inputs = to_inputs(small[1].x[:8])
    probs = predict_proba(result.model, inputs)
    for i in (0, 5):
        torch.testing.assert_close(
            predict_proba(result.model, inputs[i : i + 1]), probs[i : i + 1], atol=1e-5, rtol=0
        )


def test_cnn_on_a_non_image_input_is_a_clear_value_error() -> None:
    with pytest.raises(ValueError, match="image input"):
        training.build_model(ModelConfig(arch="cnn", input_shape=(40,)), seed=0)


def test_learning_rate_schedules() -> None:
    step = TrainConfig(lr=0.1, schedule="step", step_size=2, gamma=0.5, epochs=6)
    assert [training.lr_at(step, e) for e in range(1, 7)] == pytest.approx(
        [0.1, 0.1, 0.05, 0.05, 0.025, 0.025]
    )
    cosine = TrainConfig(lr=0.1, schedule="cosine", epochs=4)
    expected = [0.1 * (1 + math.cos(math.pi * k / 4)) / 2 for k in range(4)]
    assert [training.lr_at(cosine, e) for e in range(1, 5)] == pytest.approx(expected)
    assert training.lr_at(TrainConfig(lr=0.3), 9) == 0.3


def test_optimizer_settings_reach_torch(small: tuple[ImageDataset, ImageDataset]) -> None:
    model = nn.Linear(2, 2)
    sgd = training.make_optimizer(model, TrainConfig(optimizer="sgd", momentum=0.5, weight_decay=0.01))
    assert isinstance(sgd, torch.optim.SGD)
    assert (sgd.param_groups[0]["momentum"], sgd.param_groups[0]["weight_decay"]) == (0.5, 0.01)
    adam = training.make_optimizer(model, TrainConfig(adam_eps=1e-7, weight_decay=0.02))
    assert isinstance(adam, torch.optim.Adam)
    assert (adam.param_groups[0]["eps"], adam.param_groups[0]["weight_decay"]) == (1e-7, 0.02)
    # The schedule is applied: a step decay to a tiny rate after epoch 1 all but freezes the weights.
    frozen = TrainConfig(epochs=2, lr=0.01, schedule="step", step_size=1, gamma=1e-9)
    one, two = (train(NO_BN, replace(frozen, epochs=e), *small).model.state_dict() for e in (1, 2))
    assert all(torch.allclose(one[k], two[k], atol=1e-8) for k in one)
    free = [train(NO_BN, replace(frozen, epochs=e, schedule="none"), *small).model for e in (1, 2)]
    assert not torch.allclose(
        free[0].state_dict()["fc1.weight"], free[1].state_dict()["fc1.weight"], atol=1e-6
    )


def test_keras_init_is_glorot_uniform_with_zero_biases_and_init_scale_multiplies() -> None:
    cfg = ModelConfig(arch="cnn", channels=(8,), init="glorot")
    net = training.build_model(cfg, seed=0)
    conv, out = net.get_submodule("conv1"), net.get_submodule("out")
    assert isinstance(conv, nn.Conv2d)
    assert isinstance(out, nn.Linear)
    bound = math.sqrt(6 / (1 * 9 + 8 * 9))  # Glorot: sqrt(6 / (fan_in + fan_out)), receptive field 3×3
    assert conv.weight.abs().max() <= bound
    assert conv.weight.abs().max() > 0.9 * bound
    assert conv.bias is not None
    assert out.bias is not None
    assert torch.count_nonzero(conv.bias) == 0
    assert torch.count_nonzero(out.bias) == 0
    scaled = training.build_model(replace(cfg, init_scale=2.5), seed=0)
    torch.testing.assert_close(scaled.get_submodule("conv1").weight, conv.weight * 2.5)
    # The default (PyTorch init, scale 1) draws exactly what it always did.
    plain = training.build_model(ModelConfig(), seed=0)
    torch.manual_seed(0)
    assert torch.equal(plain.state_dict()["fc1.weight"], nn.Linear(784, 128).weight)


def test_a_training_process_flushes_subnormal_floats_to_zero() -> None:
    # Adam's moments of zero-gradient weights decay through the subnormal range, where the CPU is
    # slow; a training process treats those values as zero (see configure_training_process).
    threads = torch.get_num_threads()
    subnormal = torch.tensor([1e-39, 1.0])
    assert subnormal[0].item() != 0.0
    try:
        training.configure_training_process(1)
        assert torch.get_num_threads() == 1
        assert (subnormal * 1.0).tolist() == [0.0, 1.0]  # the input is read as zero (DAZ)
        assert (torch.tensor([1e-30]) * 1e-10).item() == 0.0  # a subnormal result is written as zero
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(threads)
    assert (subnormal * 1.0)[0].item() != 0.0  # and the test leaves the process as it found it


@pytest.mark.parametrize(
    "cfg",
    [
        ModelConfig(arch="cnn", channels=(4, 8)),
        ModelConfig(arch="resnet", depth=8, width=4, norm=NormConfig(kind="batch")),
    ],
    ids=["cnn", "resnet"],
)
def test_channels_last_layout_trains_what_the_default_layout_does(
    cfg: ModelConfig, small: tuple[ImageDataset, ImageDataset], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A conv net trains in channels-last layout on the CPU (training.to_channels_last): the same
    computation, its sums in another order, so the weights after an epoch agree to float rounding."""
    tcfg = TrainConfig(epochs=1, seed=3, optimizer="adam")
    fast = train(cfg, tcfg, *small)
    monkeypatch.setattr(training, "USE_CHANNELS_LAST", False)
    default = train(cfg, tcfg, *small)
    weights = [n for n, p in fast.model.named_parameters() if p.dim() == 4]
    assert weights
    assert all(fast.model.get_parameter(n).is_contiguous(memory_format=torch.channels_last) for n in weights)
    assert not all(
        default.model.get_parameter(n).is_contiguous(memory_format=torch.channels_last) for n in weights
    )
    a, b = fast.model.state_dict(), default.model.state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
    assert fast.epochs[0].val_loss == pytest.approx(default.epochs[0].val_loss, rel=1e-5)
