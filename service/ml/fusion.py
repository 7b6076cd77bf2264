"""Fold eval-mode BatchNorm into the adjacent Linear or Conv layer, for faster inference
(bn-semantics.md §4).

In eval mode a BN layer is a fixed per-channel affine map `y = s·x + t`, with
`s = γ / sqrt(running_var + eps)` and `t = β − running_mean·s`, so it can be merged into a Linear:

- BN right **after** a Linear or Conv (`before_activation`: Linear → BN → act) folds into it:
  `W' = diag(s)·W` (per output channel), `b' = s·b + t`.
- BN right **before** a Linear (`after_activation`: act → BN → next Linear, the article's Keras model)
  cannot fold into the layer before it (the activation is in between), so it folds into the next one:
  `W' = W·diag(s)`, `b' = b + W·t`. A BatchNorm2d after the activation of a cnn block cannot: the next
  convolution zero-pads (the padded border would not see t) and max-pooling sits in between.

Batch renormalisation, ghost BN and noisy BN are plain BN at inference (running statistics, no
noise), so they fold the same way. Weight normalisation and scaled weight standardization (`ws`) fold
by computing the reparametrised weight once into a plain weight. Dropout and the Identity slots of a
network without normalisation are identities in eval mode and are left out.
The arithmetic is done in float64 and cast back, so fused and unfused outputs agree within 1e-5.

A residual network (service/ml/resnets.py) folds block by block: each block's branch and projection
shortcut are Sequentials of their own, fused by the same rules (v1's conv → BN folds). A pre-activation
block's first BN follows the residual addition and precedes an activation: nothing to fold it into, so
v2 networks with BN stay unfused, and say so.

What cannot fold leaves the whole model unfused, and the report says why: a BN without running
statistics (`track_running_stats=False`), a BN with example weighing (`example_weight` > 0), and
the layer, group, instance, batch-layer and filter-response norms normalise each input with
statistics of that input, which no fixed weights reproduce. Folding a
module in train mode is an error: its BN layers would use batch statistics, not the buffers.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import parametrize

from service.ml.norms import BatchLayerNorm, FilterResponseNorm, ScaledWeightStandardization
from service.ml.recurrent import RecurrentLayer, has_norms
from service.ml.resnets import ResidualBlock

# Identities in eval mode: dropped from the fused copy so BN and its Linear become neighbours.
_EVAL_IDENTITY = (nn.Identity, nn.Dropout)
_WHY_NOT_ADJACENT = (
    "after a cnn block's activation, zero padding and pooling sit between it and the next conv; a "
    "pre-activation block's norm follows the residual addition and precedes an activation"
)
# Layers whose eval output depends on the input's own statistics.
_PER_INPUT = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm,
    BatchLayerNorm,
    FilterResponseNorm,
)


@dataclass(frozen=True)
class FusionReport:
    fused: bool  # every normalisation layer was folded (vacuously true for a model without any)
    # (BN layer, the Linear/Conv it was folded into); weight norm as ('fc1.weight_norm', 'fc1')
    folded: tuple[tuple[str, str], ...]
    reason: str | None  # why the model was left unfused, when it was


def fuse_bn(model: nn.Sequential) -> tuple[nn.Sequential, FusionReport]:
    """A new Sequential with every BN folded into a neighbouring Linear/Conv, and a report.

    When one normalisation layer cannot fold, nothing is folded: the input model itself is returned,
    unfused. The input is never modified.
    """
    if any(module.training for module in model.modules()):
        raise ValueError("fusing BatchNorm needs a model in eval mode (call .eval() first)")
    names = [name for name, module in model.named_children() if not isinstance(module, _EVAL_IDENTITY)]
    plan: dict[str, str] = {}  # BN name -> Linear/Conv name
    blocks: dict[str, tuple[ResidualBlock, tuple[tuple[str, str], ...]]] = {}
    for i, name in enumerate(names):
        module = model._modules[name]
        if isinstance(module, ResidualBlock):
            fused_block, block_report = _fuse_block(name, module)
            if block_report.reason is not None:
                return model, block_report
            blocks[name] = fused_block, block_report.folded
            continue
        reason = _cannot_fold(name, module)
        if reason is None and isinstance(module, _BatchNorm):
            target = _adjacent_layer(model, names, i)
            if target is None:
                reason = f"{name} has no Linear or Conv layer it can fold into ({_WHY_NOT_ADJACENT})"
            else:
                plan[name] = target
        if reason is not None:
            return model, FusionReport(fused=False, folded=(), reason=reason)
    weight_normed = [name for name in names if parametrize.is_parametrized(model._modules[name], "weight")]
    in_blocks = [pair for _, block_folded in blocks.values() for pair in block_folded]
    reparametrised = ((f"{name}.{_parametrization(model, name)}", name) for name in weight_normed)
    folded = (*plan.items(), *in_blocks, *reparametrised)
    fused = _apply(model, names, plan)
    for name, (block, _) in blocks.items():
        setattr(fused, name, block)
    return fused, FusionReport(fused=True, folded=folded, reason=None)


def _fuse_block(name: str, block: ResidualBlock) -> tuple[ResidualBlock, FusionReport]:
    """A copy of `block` with its branch (and a projection shortcut) fused; the report's names are
    qualified (`block3.branch.bn1`)."""
    fused = copy.deepcopy(block)
    folded: list[tuple[str, str]] = []
    for part_name in ("branch", "shortcut"):
        part = block.get_submodule(part_name)
        if not isinstance(part, nn.Sequential):
            continue  # an identity or zero-padding shortcut: nothing to fold
        fused_part, report = fuse_bn(part)
        prefix = f"{name}.{part_name}"
        if report.reason is not None:
            return block, FusionReport(fused=False, folded=(), reason=f"{prefix}.{report.reason}")
        folded += [(f"{prefix}.{bn}", f"{prefix}.{layer}") for bn, layer in report.folded]
        setattr(fused, part_name, fused_part)
    return fused, FusionReport(fused=True, folded=tuple(folded), reason=None)


def _parametrization(model: nn.Sequential, name: str) -> str:
    """What reparametrises a layer's weight: weight_norm, or (kind ws) weight_standardization."""
    chain = model.get_submodule(f"{name}.parametrizations.weight")
    standardized = any(isinstance(p, ScaledWeightStandardization) for p in chain.children())
    return "weight_standardization" if standardized else "weight_norm"


def _cannot_fold(name: str, module: nn.Module) -> str | None:
    if isinstance(module, RecurrentLayer) and has_norms(module):
        return (
            f"{name}'s norms sit inside its recurrent cell, each time step with its own statistics, "
            "between the two weight products it adds: no single Linear can absorb them"
        )
    if isinstance(module, _BatchNorm) and getattr(module, "example_weight", 0) > 0:
        return (
            f"{name} weighs each example into its statistics at inference (example_weight > 0): its "
            "normalisation depends on the input, which no fixed weights can reproduce"
        )
    if isinstance(module, _BatchNorm) and (module.running_mean is None or module.running_var is None):
        return (
            f"{name} keeps no running statistics (track_running_stats=false): in eval mode it normalises "
            "each batch with that batch's statistics, which no fixed weights can reproduce"
        )
    if isinstance(module, _PER_INPUT):
        return (
            f"{name} ({type(module).__name__}) normalises each input with that input's own statistics at "
            "inference, which no fixed weights can reproduce"
        )
    return None


def _adjacent_layer(model: nn.Sequential, names: list[str], i: int) -> str | None:
    """The Linear/Conv right before BN `names[i]` (preferred), else a Linear right after it."""
    if i > 0 and isinstance(model._modules[names[i - 1]], nn.Linear | nn.Conv2d):
        return names[i - 1]
    bn = model._modules[names[i]]
    if i + 1 < len(names) and isinstance(model._modules[names[i + 1]], nn.Linear) and _bn_is_1d(bn):
        return names[i + 1]
    return None


def _bn_is_1d(bn: nn.Module | None) -> bool:
    return not isinstance(bn, nn.BatchNorm2d | nn.BatchNorm3d)


def _scale_shift(bn: _BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, t) in float64 such that bn(x) == s·x + t in eval mode."""
    assert bn.running_mean is not None
    assert bn.running_var is not None
    mean, var = bn.running_mean.double(), bn.running_var.double()
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(mean)
    scale = gamma / torch.sqrt(var + bn.eps)
    return scale, beta - mean * scale


def _apply(model: nn.Sequential, names: list[str], plan: dict[str, str]) -> nn.Sequential:
    layers: OrderedDict[str, nn.Module] = OrderedDict(
        (name, _copy(model._modules[name])) for name in names if name not in plan
    )
    with torch.no_grad():
        for bn_name, layer_name in plan.items():
            bn = model._modules[bn_name]
            layer = layers[layer_name]
            assert isinstance(bn, _BatchNorm)
            assert isinstance(layer, nn.Linear | nn.Conv2d)
            _fold(bn, layer, bn_after_layer=names.index(bn_name) > names.index(layer_name))
    fused = nn.Sequential(layers)
    return fused.eval()


def _copy(module: nn.Module | None) -> nn.Module:
    """A deep copy; a weight-normalised layer becomes a plain one holding g·v/‖v‖. (Removing the
    parametrization from a deepcopy would also break the original: they share its generated class.)"""
    assert module is not None
    if not parametrize.is_parametrized(module, "weight"):
        return copy.deepcopy(module)
    assert isinstance(module, nn.Linear | nn.Conv2d)
    plain: nn.Linear | nn.Conv2d
    if isinstance(module, nn.Linear):
        plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
    else:
        pair = tuple[int, int]  # a Conv2d's sizes are pairs; torch types them as tuples of any length
        plain = nn.Conv2d(
            module.in_channels,
            module.out_channels,
            cast(pair, module.kernel_size),
            cast(pair, module.stride),
            cast(pair | str, module.padding),
            cast(pair, module.dilation),
            module.groups,
            module.bias is not None,
            module.padding_mode,
        )
    with torch.no_grad():
        plain.weight.copy_(module.weight)
        if module.bias is not None:
            assert plain.bias is not None
            plain.bias.copy_(module.bias)
    return plain.eval()


def _fold(bn: _BatchNorm, layer: nn.Linear | nn.Conv2d, *, bn_after_layer: bool) -> None:
    scale, shift = _scale_shift(bn)
    weight = layer.weight.double()
    bias = (
        layer.bias.double() if layer.bias is not None else torch.zeros(weight.shape[0], dtype=torch.float64)
    )
    if bn_after_layer:  # BN(Wx + b) = s·(Wx + b) + t, s per output channel
        per_output = scale.reshape(-1, *([1] * (weight.dim() - 1)))
        new_weight, new_bias = weight * per_output, bias * scale + shift
    else:  # W·(s·x + t) + b, a Linear after a BatchNorm1d
        new_weight, new_bias = weight * scale[None, :], bias + weight @ shift
    layer.weight.copy_(new_weight.to(layer.weight.dtype))
    if layer.bias is None:
        layer.bias = nn.Parameter(new_bias.to(layer.weight.dtype))
    else:
        layer.bias.copy_(new_bias.to(layer.bias.dtype))
