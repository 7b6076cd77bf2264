"""Networks built from a ModelConfig: the article's MLP, with or without batch normalization.

The article's Keras model is Flatten -> Dense(128, relu) -> BatchNormalization -> Dense(10) (logits;
the softmax lives in the loss). `make_net` generalises it to any list of hidden widths, three
activations and the two places BN can sit, and nothing else: every switch is a config field.
"""

from __future__ import annotations

import math
from collections import OrderedDict

from torch import nn

from service.ml.config import Activation, ModelConfig, NormConfig

_ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}


def make_net(cfg: ModelConfig) -> nn.Sequential:
    """Build the network described by `cfg`, freshly initialised from torch's global RNG.

    Modules are named (flatten, fc1, act1, bn1, ..., out) so that state_dict keys such as
    `fc1.weight` or `bn1.running_mean` do not shift when a layer is added or removed elsewhere:
    checkpoints stay readable across configurations.
    """
    if cfg.arch != "mlp":
        raise ValueError(f"unknown arch {cfg.arch!r}; only 'mlp' is supported")
    if cfg.norm.kind not in ("none", "batch"):
        raise ValueError(f"unknown norm kind {cfg.norm.kind!r}; expected 'none' or 'batch'")
    if cfg.num_classes < 2 or any(width < 1 for width in cfg.hidden):
        raise ValueError("num_classes must be >= 2 and every hidden width >= 1")

    layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
    in_features = math.prod(cfg.input_shape)
    for i, width in enumerate(cfg.hidden, start=1):
        layers.update(_hidden_block(i, in_features, width, cfg.activation, cfg.norm))
        in_features = width
    layers["out"] = nn.Linear(in_features, cfg.num_classes)
    return nn.Sequential(layers)


def _hidden_block(
    i: int, in_features: int, width: int, activation: Activation, norm: NormConfig
) -> OrderedDict[str, nn.Module]:
    """Linear + activation, with BN after the activation (the Keras code) or before it (the paper)."""
    if activation not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {sorted(_ACTIVATIONS)}")
    fc: tuple[str, nn.Module] = (f"fc{i}", nn.Linear(in_features, width))
    act: tuple[str, nn.Module] = (f"act{i}", _ACTIVATIONS[activation]())
    if norm.kind == "none":
        return OrderedDict([fc, act])
    bn: tuple[str, nn.Module] = (f"bn{i}", _batch_norm(width, norm))
    if norm.position == "before_activation":
        return OrderedDict([fc, bn, act])
    if norm.position == "after_activation":
        return OrderedDict([fc, act, bn])
    raise ValueError(f"unknown norm position {norm.position!r}")


def _batch_norm(width: int, norm: NormConfig) -> nn.BatchNorm1d:
    # momentum uses PyTorch's convention (weight of the new batch; Keras 0.99 == torch 0.01), and
    # None means a cumulative average, which BatchNorm1d implements itself.
    return nn.BatchNorm1d(
        width,
        eps=norm.eps,
        momentum=norm.momentum,
        affine=norm.affine,
        track_running_stats=norm.track_running_stats,
    )


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (BN's running buffers are not parameters, as in Keras' 'trainable')."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
