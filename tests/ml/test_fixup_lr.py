"""Fixup's per-group learning rate (Zhang, Dauphin & Ma 2019; the authors' cifar_train.py): the scalar
biases and multipliers, and by the authors' name rule the classifier's bias, train at a tenth of the
run's learning rate, through every optimizer bnlab builds, every epoch's schedule and a resumption."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from service.ml.config import ModelConfig, NormConfig, TrainConfig
from service.ml.fastpath import MlpStep, supports_optimizer
from service.ml.nets import make_net
from service.ml.resnets import ScalarBias, ScalarScale
from service.ml.resume import load_training_state, restore, save_training_state
from service.ml.training import lr_at, make_optimizer, set_learning_rate

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


def test_a_fixup_resmlp_is_not_a_fast_path_mlp() -> None:
    assert MlpStep.for_model(make_net(FIXUP["resmlp"])) is None
