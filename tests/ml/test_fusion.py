"""Folding eval-mode BN into Linear layers (bn-semantics.md §4, oracle 7): every architecture and norm
combination make_net builds, fused output within 1e-5 of unfused; the ones that cannot fold say why."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from service.ml.config import ModelConfig, NormConfig
from service.ml.fusion import fuse_bn
from service.ml.nets import make_net, norm_slots

WIDTHS = (48, 32, 24)
ACTIVATIONS = ("relu", "sigmoid", "tanh")
DEPTHS = (1, 2, 3)

BN_COMBINATIONS = [
    ModelConfig(
        hidden=WIDTHS[:depth],
        activation=activation,
        norm=NormConfig(
            kind="batch", position=position, momentum=momentum, affine=affine, track_running_stats=stats
        ),
    )
    for position, activation, depth, momentum, affine, stats in itertools.product(
        ("after_activation", "before_activation"),
        ACTIVATIONS,
        DEPTHS,
        (0.01, None),
        (True, False),
        (True, False),
    )
]
NO_BN_COMBINATIONS = [
    ModelConfig(hidden=WIDTHS[:depth], activation=activation, norm=NormConfig(kind="none"))
    for activation, depth in itertools.product(ACTIVATIONS, DEPTHS)
]


# Every other arch × kind × position: BN-like kinds fold (cnn: only right after the conv), weight norm
# folds its parametrisation, per-input norms stay unfused and say so.
OTHER_COMBINATIONS = [
    ModelConfig(
        arch=arch,
        hidden=(24, 16),
        channels=(4, 8),
        dropout=0.25,
        dropout_position=dropout_position,
        norm=NormConfig(kind=kind, position=position, num_groups=4, momentum=0.3, bln_batch_size=16),
    )
    for arch, kind, position, dropout_position in itertools.product(
        ("mlp", "cnn"),
        ("none", "batch", "layer", "group", "instance", "batch_renorm", "ghost", "weight", "batch_layer"),
        ("after_activation", "before_activation"),
        ("before_norm", "after_norm"),
    )
    if not (arch == "mlp" and kind in ("batch", "none", "instance"))
]
FOLDS = {"none", "batch", "batch_renorm", "ghost", "weight"}


def trained_like(cfg: ModelConfig, seed: int = 0) -> nn.Sequential:
    """A net whose BN buffers and affine parameters are far from their initial values, in eval mode."""
    torch.manual_seed(seed)
    net = make_net(cfg)
    net.train()
    with torch.no_grad():
        for _ in range(5):
            net(torch.rand(16, 1, 28, 28))
        for _, module in norm_slots(net):
            for name, parameter in module.named_parameters():
                parameter.uniform_(0.5, 2.0) if name == "weight" else parameter.uniform_(-0.5, 0.5)
    return net.eval()


def config_id(cfg: ModelConfig) -> str:
    n = cfg.norm
    if n.kind == "none":
        return f"none-{cfg.activation}-d{len(cfg.hidden)}"
    stats = "stats" if n.track_running_stats else "nostats"
    return f"{n.position}-{cfg.activation}-d{len(cfg.hidden)}-m{n.momentum}-affine{n.affine}-{stats}"


@pytest.mark.parametrize("cfg", BN_COMBINATIONS + NO_BN_COMBINATIONS, ids=config_id)
def test_fused_matches_unfused_within_1e_5_or_says_why_not(cfg: ModelConfig) -> None:
    net = trained_like(cfg)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.rand(64, 1, 28, 28)
    fused, report = fuse_bn(net)
    if cfg.norm.kind == "batch" and not cfg.norm.track_running_stats:
        assert not report.fused
        assert fused is net
        assert report.reason is not None
        assert "track_running_stats" in report.reason
        return
    assert report.fused
    assert report.reason is None
    assert not any(isinstance(m, nn.BatchNorm1d) for m in fused.modules())
    expected_folds = len(cfg.hidden) if cfg.norm.kind == "batch" else 0
    assert len(report.folded) == expected_folds
    with torch.inference_mode():
        torch.testing.assert_close(fused(x), net(x), atol=1e-5, rtol=0)
    # The served unfused model is untouched by fusing.
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_where_each_position_folds() -> None:
    after = ModelConfig(hidden=(32, 16), norm=NormConfig(position="after_activation"))
    _, report = fuse_bn(trained_like(after))
    # Linear -> act -> BN: the BN folds into the NEXT Linear.
    assert report.folded == (("bn1", "fc2"), ("bn2", "out"))
    before = ModelConfig(hidden=(32, 16), norm=NormConfig(position="before_activation"))
    fused, report = fuse_bn(trained_like(before))
    assert report.folded == (("bn1", "fc1"), ("bn2", "fc2"))
    assert list(fused._modules) == ["flatten", "fc1", "act1", "fc2", "act2", "out"]


def test_fusion_with_tiny_variance_and_keras_eps_1e_5() -> None:
    cfg = ModelConfig(hidden=(32,), activation="sigmoid", norm=NormConfig(eps=1e-5))
    net = trained_like(cfg)
    bn = net.get_submodule("bn1")
    assert isinstance(bn, nn.BatchNorm1d)
    assert bn.running_var is not None
    bn.running_var.fill_(1e-4)  # s = γ/sqrt(1e-4 + 1e-5) ≈ 10γ: large rescaling
    x = torch.rand(32, 1, 28, 28)
    fused, report = fuse_bn(net)
    assert report.fused
    with torch.inference_mode():
        torch.testing.assert_close(fused(x), net(x), atol=1e-5, rtol=1e-5)


def test_fusing_a_model_in_train_mode_is_an_error() -> None:
    net = make_net(ModelConfig())
    net.train()
    with pytest.raises(ValueError, match="eval mode"):
        fuse_bn(net)


def test_fused_model_is_a_different_object_even_without_bn() -> None:
    net = trained_like(ModelConfig(norm=NormConfig(kind="none")))
    fused, report = fuse_bn(net)
    assert report.fused
    assert report.folded == ()
    assert fused is not net
    fused.get_submodule("out").bias.data.add_(1.0)  # type: ignore[union-attr]
    assert not torch.equal(fused.get_submodule("out").bias, net.get_submodule("out").bias)


def other_id(cfg: ModelConfig) -> str:
    return f"{cfg.arch}-{cfg.norm.kind}-{cfg.norm.position}-dropout_{cfg.dropout_position}"


@pytest.mark.parametrize("cfg", OTHER_COMBINATIONS, ids=other_id)
def test_every_arch_and_norm_fuses_within_1e_5_or_says_why_not(cfg: ModelConfig) -> None:
    net = trained_like(cfg)
    x = torch.rand(32, 1, 28, 28)
    fused, report = fuse_bn(net)
    cnn_bn_after_act = cfg.arch == "cnn" and cfg.norm.position == "after_activation"
    can_fold = cfg.norm.kind in FOLDS and not (cnn_bn_after_act and cfg.norm.kind not in ("none", "weight"))
    assert report.fused == can_fold, report.reason
    if not can_fold:
        assert fused is net
        assert report.reason is not None
        assert "bn1" in report.reason
        return
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm | nn.Dropout) for m in fused.modules())
    assert not any(parametrize.is_parametrized(m) for m in fused.modules())
    expected_folds = 0 if cfg.norm.kind == "none" else 2
    assert len(report.folded) == expected_folds
    with torch.inference_mode():
        torch.testing.assert_close(fused(x), net(x), atol=1e-5, rtol=0)
    assert net(x).shape == (32, 10)  # the original still works (weight norm's class is not shared)
