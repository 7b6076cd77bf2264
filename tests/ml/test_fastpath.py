"""The hand-written MLP step computes autograd's gradients and BatchNorm's running statistics, and
training through it gives the run that autograd would (up to rounding), deterministically."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from service.ml import training
from service.ml.config import ModelConfig, NormConfig, TrainConfig
from service.ml.datasets import make_synthetic, train_val_split
from service.ml.fastpath import Batches, MlpStep, supports_optimizer
from service.ml.nets import make_net
from service.ml.resume import load_training_state
from tests.ml.test_training import Recorder, without_time

SUPPORTED = {
    "article": ModelConfig(),
    "no-norm": ModelConfig(norm=NormConfig(kind="none")),
    "before-activation": ModelConfig(norm=NormConfig(position="before_activation")),
    "tanh-two-layers": ModelConfig(hidden=(24, 12), activation="tanh"),
    "sigmoid-no-affine": ModelConfig(activation="sigmoid", norm=NormConfig(affine=False)),
    "gamma-only": ModelConfig(norm=NormConfig(center=False)),
    "cumulative-average": ModelConfig(norm=NormConfig(momentum=None)),
    "batch-statistics-only": ModelConfig(norm=NormConfig(track_running_stats=False)),
    "no-norm-before-activation": ModelConfig(norm=NormConfig(kind="none", position="before_activation")),
}
UNSUPPORTED = {
    "dropout": ModelConfig(dropout=0.1),
    "layer-norm": ModelConfig(norm=NormConfig(kind="layer")),
    "weight-norm": ModelConfig(norm=NormConfig(kind="weight")),
    "ghost": ModelConfig(norm=NormConfig(kind="ghost", virtual_batch_size=8)),
    "gelu": ModelConfig(activation="gelu"),
    "cnn": ModelConfig(arch="cnn", channels=(4,)),
}


def float64_net(cfg: ModelConfig) -> nn.Module:
    torch.manual_seed(3)
    return make_net(cfg).double().train()


def batch(n: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 28, 28, generator=generator, dtype=torch.float64)
    return x, torch.randint(0, 10, (n,), generator=generator)


@pytest.mark.parametrize("cfg", SUPPORTED.values(), ids=SUPPORTED.keys())
def test_gradients_and_running_statistics_equal_autograd_in_float64(cfg: ModelConfig) -> None:
    reference, fast_net = float64_net(cfg), float64_net(cfg)
    fast = MlpStep.for_model(fast_net)
    assert fast is not None
    for seed in range(3):  # several steps: running statistics and num_batches_tracked accumulate
        x, y = batch(seed=seed)
        logits = reference(x)
        loss = F.cross_entropy(logits, y)
        reference.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        fast_loss, correct = fast.step(x, y)
        torch.testing.assert_close(fast_loss, loss.detach(), rtol=1e-12, atol=1e-12)
        assert correct.item() == (logits.argmax(dim=1) == y).sum().item()
        for (name, p), q in zip(reference.named_parameters(), fast_net.parameters(), strict=True):
            assert q.grad is not None, name
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-12, msg=name)
        for (name, b), c in zip(reference.named_buffers(), fast_net.buffers(), strict=True):
            torch.testing.assert_close(c, b, rtol=1e-12, atol=1e-12, msg=name)


def test_the_gradient_check_can_fail() -> None:
    # The comparison above is not vacuous: a network with other weights gives other gradients.
    cfg = SUPPORTED["article"]
    reference, other = float64_net(cfg), copy.deepcopy(float64_net(cfg))
    with torch.no_grad():
        other.fc1.weight.mul_(1.01)
    fast = MlpStep.for_model(other)
    assert fast is not None
    x, y = batch()
    F.cross_entropy(reference(x), y).backward()  # type: ignore[no-untyped-call]
    fast.step(x, y)
    assert other.fc1.weight.grad is not None
    assert not torch.allclose(other.fc1.weight.grad, reference.fc1.weight.grad)


@pytest.mark.parametrize("cfg", UNSUPPORTED.values(), ids=UNSUPPORTED.keys())
def test_unsupported_networks_train_through_autograd(cfg: ModelConfig) -> None:
    assert MlpStep.for_model(make_net(cfg)) is None


@pytest.fixture(scope="module")
def data() -> tuple[training.ImageDataset, training.ImageDataset]:
    # 450 training samples: a last batch of 2 (450 = 14·32 + 2), so partial batches are covered too.
    return train_val_split(make_synthetic(600, seed=4), 0.25)


def trained(
    cfg: ModelConfig,
    tcfg: TrainConfig,
    data: tuple[training.ImageDataset, training.ImageDataset],
    *,
    fast: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> training.TrainResult:
    monkeypatch.setattr(training, "USE_FAST_PATH", fast)
    model = make_net(cfg)
    optimizer = training.make_optimizer(model, tcfg)
    assert training.make_step(model, optimizer, tcfg.batch_size).fast_path == fast  # the path under test
    return training.train(cfg, tcfg, *data)


OPTIMIZERS = {
    "adam": TrainConfig(epochs=2, seed=1),
    "adam-weight-decay-cosine": TrainConfig(epochs=2, seed=1, weight_decay=1e-3, schedule="cosine"),
    "sgd-momentum": TrainConfig(epochs=2, seed=1, optimizer="sgd", lr=0.05),
    "sgd-weight-decay": TrainConfig(epochs=2, seed=1, optimizer="sgd", lr=0.05, weight_decay=1e-3),
    "sgd-plain": TrainConfig(epochs=2, seed=1, optimizer="sgd", lr=0.05, momentum=0.0),
}


@pytest.mark.parametrize("tcfg", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
@pytest.mark.parametrize("cfg", SUPPORTED.values(), ids=SUPPORTED.keys())
def test_training_through_the_fast_path_is_autograd_training_bit_for_bit(
    cfg: ModelConfig,
    tcfg: TrainConfig,
    data: tuple[training.ImageDataset, training.ImageDataset],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The compiled loop runs the kernels autograd and the optimizer run, in their order, so the two
    # paths give the same run: every weight, buffer, optimizer state and metric, exactly.
    fast = trained(cfg, tcfg, data, fast=True, monkeypatch=monkeypatch)
    slow = trained(cfg, tcfg, data, fast=False, monkeypatch=monkeypatch)
    assert [without_time(m) for m in fast.epochs] == [without_time(m) for m in slow.epochs]
    expected = slow.model.state_dict()
    for key, value in fast.model.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_the_bit_for_bit_comparison_can_fail(
    data: tuple[training.ImageDataset, training.ImageDataset], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Not vacuous: another learning rate on one side gives another run.
    cfg = SUPPORTED["article"]
    fast = trained(cfg, TrainConfig(epochs=1, seed=1), data, fast=True, monkeypatch=monkeypatch)
    slow = trained(cfg, TrainConfig(epochs=1, seed=1, lr=1.001e-3), data, fast=False, monkeypatch=monkeypatch)
    assert not torch.equal(fast.model.fc1.weight, slow.model.fc1.weight)


def test_the_fast_path_is_deterministic_and_resumes_bit_identically(
    data: tuple[training.ImageDataset, training.ImageDataset],
) -> None:
    cfg, three = ModelConfig(hidden=(32,)), TrainConfig(epochs=3, seed=2)
    assert MlpStep.for_model(make_net(cfg)) is not None  # this test is about the fast path
    straight = Recorder()
    whole = training.train(cfg, three, *data, callbacks=straight)
    again = training.train(cfg, three, *data)
    first = Recorder()
    training.train(cfg, TrainConfig(epochs=1, seed=2), *data, callbacks=first)
    rest = Recorder()
    resumed = training.train(
        cfg, three, *data, callbacks=rest, resume=load_training_state(first.snapshots[0])
    )
    assert [without_time(m) for m in again.epochs] == [without_time(m) for m in whole.epochs]
    assert [without_time(m) for m in rest.epochs] == [without_time(m) for m in straight.epochs[1:]]
    for key, value in whole.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key


def test_device_selection_works_on_a_machine_without_a_gpu(
    data: tuple[training.ImageDataset, training.ImageDataset],
) -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert training.resolve_device("auto").type == expected
    assert training.resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="sees no CUDA device"):
            training.resolve_device("cuda")
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        training.resolve_device("tpu")
    # The auto device trains the run the default does (on a CPU-only machine, the same bits).
    cfg, tcfg = ModelConfig(hidden=(16,)), TrainConfig(epochs=1, seed=5)
    on_auto = training.train(cfg, tcfg, *data, device=training.resolve_device("auto"))
    default = training.train(cfg, tcfg, *data)
    if expected == "cpu":
        assert without_time(on_auto.epochs[0]) == without_time(default.epochs[0])
    assert next(on_auto.model.parameters()).device.type == expected


def test_optimizers_the_loop_does_not_reproduce_go_through_autograd() -> None:
    params = list(make_net(SUPPORTED["article"]).parameters())
    assert supports_optimizer(torch.optim.Adam(params, fused=True))
    assert supports_optimizer(torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-4))
    for other in (
        torch.optim.Adam(params),  # not fused: another kernel, other rounding
        torch.optim.Adam(params, fused=True, amsgrad=True),
        torch.optim.AdamW(params, fused=True),
        torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True),
        torch.optim.SGD(params, lr=0.1, momentum=0.9, dampening=0.5),
        torch.optim.RMSprop(params),
        torch.optim.SGD([{"params": params[:2]}, {"params": params[2:]}], lr=0.1),
    ):
        assert not supports_optimizer(other), other


@pytest.mark.parametrize("uneven", [False, True], ids=["one-counter", "per-parameter-counters"])
def test_the_compiled_loop_counts_adam_steps_as_torch_does(uneven: bool) -> None:
    # The loop increments one shared counter while every parameter's step count is equal, and each
    # parameter's own counter otherwise; either way the optimizer's state ends as optimizer.step()'s.
    torch.manual_seed(5)
    fast_net = make_net(ModelConfig(hidden=(16,)))
    slow_net = copy.deepcopy(fast_net)
    tcfg = TrainConfig()
    nets = {"fast": fast_net, "slow": slow_net}
    optimizers = {name: training.make_optimizer(net, tcfg) for name, net in nets.items()}
    x, y = batch(n=96, seed=7)
    x, order = x.float().flatten(1), torch.randperm(96, generator=torch.Generator().manual_seed(0))
    batches = {name: Batches.for_epoch(x, y, order, 16) for name in nets}
    for name, net in nets.items():  # a first step through torch creates the state
        training.autograd_steps(net, optimizers[name], training.Shard(), batches[name], 0, 16)
        if uneven:
            optimizers[name].state[net.fc1.bias]["step"].fill_(7.0)
    fast = MlpStep.for_model(fast_net)
    assert fast is not None
    fast.run(optimizers["fast"], batches["fast"], 16, 96)
    training.autograd_steps(slow_net, optimizers["slow"], training.Shard(), batches["slow"], 16, 96)
    for p, q in zip(fast_net.parameters(), slow_net.parameters(), strict=True):
        assert torch.equal(p, q)
        fast_state, slow_state = optimizers["fast"].state[p], optimizers["slow"].state[q]
        assert fast_state.keys() == slow_state.keys()
        for key, value in fast_state.items():
            assert torch.equal(value, slow_state[key]), key
    steps = {float(state["step"]) for state in optimizers["fast"].state.values()}
    assert steps == ({6.0, 12.0} if uneven else {6.0})
