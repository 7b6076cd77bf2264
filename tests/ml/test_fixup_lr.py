"""Fixup's per-group learning rate (Zhang, Dauphin & Ma 2019; the authors' cifar_train.py): the scalar
biases and multipliers, and by the authors' name rule the classifier's bias, train at a tenth of the
run's learning rate, through every optimizer bnlab builds, every epoch's schedule and a resumption."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from service.ml.config import ModelConfig, NormConfig, TrainConfig
from service.ml.datasets import make_synthetic, train_val_split
from service.ml.fastpath import MlpStep, supports_optimizer
from service.ml.nets import make_net
from service.ml.resnets import ScalarBias, ScalarScale
from service.ml.resume import ResumeError, load_training_state, restore, save_training_state
from service.ml.training import (
    EpochMetrics,
    NullCallbacks,
    Snapshot,
    lr_at,
    make_optimizer,
    set_learning_rate,
    train,
)

NONE = NormConfig(kind="none")
SMALL = (1, 12, 12)
FIXUP = {
    "resnet-v1": ModelConfig(
        arch="resnet", depth=8, width=4, input_shape=SMALL, norm=NONE, residual_init="fixup"
    ),
    "resnet-v2": ModelConfig(
        arch="resnet",
        depth=8,
        width=4,
        input_shape=SMALL,
        norm=NONE,
        residual_init="fixup",
        block="pre_activation",
    ),
    "resnet-projection": ModelConfig(
        arch="resnet",
        depth=8,
        width=4,
        input_shape=SMALL,
        norm=NONE,
        residual_init="fixup",
        shortcut="projection",
    ),
    "resmlp": ModelConfig(
        arch="resmlp", depth=6, width=16, input_shape=SMALL, norm=NONE, residual_init="fixup"
    ),
}


def fixup_scalars(net: nn.Module) -> set[int]:
    """Written from the paper's description, not from the code under test: each scalar bias and
    multiplier module's one parameter, and the classifier's bias."""
    scalars = {
        id(p) for m in net.modules() if isinstance(m, ScalarBias | ScalarScale) for p in m.parameters()
    }
    head = net.get_submodule("out")
    assert isinstance(head, nn.Linear)
    assert head.bias is not None
    return scalars | {id(head.bias)}


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
@pytest.mark.parametrize("name", list(FIXUP))
def test_the_fixup_scalars_and_only_they_train_at_a_tenth_of_the_rate(name: str, optimizer: str) -> None:
    net = make_net(FIXUP[name])
    opt = make_optimizer(net, TrainConfig(optimizer=optimizer, lr=0.3))  # type: ignore[arg-type]
    rest, slow = opt.param_groups
    assert {id(p) for p in slow["params"]} == fixup_scalars(net)
    assert all(p.numel() == 1 for p in slow["params"][:-1])  # the classifier bias last, 10 values
    assert {id(p) for p in rest["params"]} == {id(p) for p in net.parameters()} - fixup_scalars(net)
    assert (rest["lr"], slow["lr"]) == (0.3, pytest.approx(0.03))
    # The compiled fast path takes one group only: a Fixup network never trains through it.
    assert not supports_optimizer(opt)


@pytest.mark.parametrize("init", ["default", "skipinit"])
def test_without_fixup_there_is_one_group_at_the_rate(init: str) -> None:
    cfg = dataclasses.replace(FIXUP["resnet-v1"], residual_init=init)  # type: ignore[arg-type]
    opt = make_optimizer(make_net(cfg), TrainConfig(lr=0.3))
    assert [g["lr"] for g in opt.param_groups] == [0.3]


def test_an_sgd_step_moves_the_scalars_by_a_tenth_of_the_others_rate() -> None:
    torch.manual_seed(0)
    net = make_net(FIXUP["resnet-v1"])
    with torch.no_grad():  # Fixup starts its classifier and last branch layers at 0: move them off it
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    opt = make_optimizer(net, TrainConfig(optimizer="sgd", lr=0.5, momentum=0.0))
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    F.cross_entropy(net(torch.randn(8, *SMALL)), torch.arange(8) % 10).backward()  # type: ignore[no-untyped-call]
    grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    opt.step()
    slow = fixup_scalars(net)
    for n, p in net.named_parameters():
        rate = 0.05 if id(p) in slow else 0.5
        torch.testing.assert_close(p.detach(), before[n] - rate * grads[n], msg=n)


def test_every_epochs_rate_and_a_resumption_keep_the_ratio() -> None:
    tcfg = TrainConfig(optimizer="sgd", lr=0.2, schedule="step", step_size=1, gamma=0.5, epochs=3)
    net = make_net(FIXUP["resmlp"])
    opt = make_optimizer(net, tcfg)
    set_learning_rate(opt, lr_at(tcfg, 3))
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.05, 0.005])
    # A training state stores the groups; restored into a fresh optimizer, the ratio stays.
    state = load_training_state(save_training_state(net, opt, epoch=3))
    fresh = make_optimizer(make_net(FIXUP["resmlp"]), tcfg)
    restore(state, make_net(FIXUP["resmlp"]), fresh)
    set_learning_rate(fresh, lr_at(tcfg, 3))
    assert [g["lr"] for g in fresh.param_groups] == pytest.approx([0.05, 0.005])


def test_a_fixup_state_saved_with_one_param_group_is_refused_naming_the_cause() -> None:
    # What an older bnlab saved for a Fixup net: every parameter in one group, scalars at the full rate.
    tcfg = TrainConfig(optimizer="sgd", lr=0.2, momentum=0.9)
    old_net = make_net(FIXUP["resmlp"])
    one_group = torch.optim.SGD(old_net.parameters(), lr=0.2, momentum=0.9)
    F.cross_entropy(old_net(torch.randn(4, *SMALL)), torch.arange(4)).backward()  # type: ignore[no-untyped-call]
    one_group.step()  # momentum buffers in the state, as after an epoch
    state = load_training_state(save_training_state(old_net, one_group, epoch=2))
    net = make_net(FIXUP["resmlp"])
    with pytest.raises(ResumeError, match=r"saved with 1 optimizer param group\(s\).* has 2\. A Fixup"):
        restore(state, net, make_optimizer(net, tcfg))


def test_a_fixup_resmlp_is_not_a_fast_path_mlp() -> None:
    assert MlpStep.for_model(make_net(FIXUP["resmlp"])) is None


def test_the_training_loop_sets_each_epochs_rate_on_both_groups() -> None:
    data = train_val_split(make_synthetic(120, seed=2), 0.25)
    cfg = dataclasses.replace(FIXUP["resmlp"], input_shape=(1, 28, 28))
    tcfg = TrainConfig(epochs=2, lr=0.01, schedule="step", step_size=1, gamma=0.5, probes=())
    states: list[bytes] = []  # taken at each epoch's end (a Snapshot serialises when called)

    class Keep(NullCallbacks):
        def on_epoch_end(self, metrics: EpochMetrics, snapshot: Snapshot) -> None:
            states.append(snapshot())

    result = train(cfg, tcfg, *data, Keep())
    assert all(math.isfinite(m.train_loss) for m in result.epochs)
    groups = [load_training_state(s).optimizer_state["param_groups"] for s in states]
    rates = [g["lr"] for epoch in groups for g in epoch]
    assert rates == pytest.approx([0.01, 0.001, 0.005, 0.0005])  # step decay, scalars at a tenth
