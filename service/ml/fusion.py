"""Fold eval-mode BatchNorm into the adjacent Linear layer, for faster inference (bn-semantics.md §4).

In eval mode a BN layer is a fixed per-channel affine map `y = s·x + t`, with
`s = γ / sqrt(running_var + eps)` and `t = β − running_mean·s`, so it can be merged into a Linear:

- BN right **after** a Linear (`before_activation`: Linear → BN → act) folds into that Linear:
  `W' = diag(s)·W`, `b' = s·b + t`.
- BN right **before** a Linear (`after_activation`: act → BN → next Linear, the article's Keras model)
  cannot fold into the layer before it (the activation is in between), so it folds into the next one:
  `W' = W·diag(s)`, `b' = b + W·t`.

The arithmetic is done in float64 and cast back, so fused and unfused outputs agree within 1e-5.
A BN without running statistics (`track_running_stats=False`) normalises every batch with that
batch's own statistics even in eval mode: no fixed weights reproduce it, so such a model is left
unfused and the report says why. Folding a module in train mode is an error: its BN layers would
use batch statistics, not the buffers being folded.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class FusionReport:
    fused: bool  # every BN layer was folded (vacuously true for a model without BN)
    folded: tuple[tuple[str, str], ...]  # (BN layer, the Linear it was folded into)
    reason: str | None  # why the model was left unfused, when it was


def fuse_bn(model: nn.Sequential) -> tuple[nn.Sequential, FusionReport]:
    """A new Sequential with every BatchNorm1d folded into a neighbouring Linear, and a report.

    When one BN layer cannot fold, nothing is folded: the input model itself is returned, unfused.
    The input is never modified.
    """
    if any(module.training for module in model.modules()):
        raise ValueError("fusing BatchNorm needs a model in eval mode (call .eval() first)")
    names = list(model._modules)
    plan: dict[str, str] = {}  # BN name -> Linear name
    for i, name in enumerate(names):
        module = model._modules[name]
        if not isinstance(module, nn.BatchNorm1d):
            continue
        reason = _cannot_fold(name, module)
        target = _adjacent_linear(model, names, i)
        if reason is None and target is None:
            reason = f"{name} has no Linear layer right before or right after it"
        if reason is not None:
            return model, FusionReport(fused=False, folded=(), reason=reason)
        assert target is not None
        plan[name] = target
    return _apply(model, names, plan), FusionReport(fused=True, folded=tuple(plan.items()), reason=None)


def _cannot_fold(name: str, bn: nn.BatchNorm1d) -> str | None:
    if bn.running_mean is None or bn.running_var is None:
        return (
            f"{name} keeps no running statistics (track_running_stats=false): in eval mode it normalises "
            "each batch with that batch's statistics, which no fixed weights can reproduce"
        )
    return None


def _adjacent_linear(model: nn.Sequential, names: list[str], i: int) -> str | None:
    """The Linear right before BN `names[i]` (preferred), else the one right after it."""
    if i > 0 and isinstance(model._modules[names[i - 1]], nn.Linear):
        return names[i - 1]
    if i + 1 < len(names) and isinstance(model._modules[names[i + 1]], nn.Linear):
        return names[i + 1]
    return None


def _scale_shift(bn: nn.BatchNorm1d) -> tuple[torch.Tensor, torch.Tensor]:
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
        (name, copy.deepcopy(model._modules[name])) for name in names if name not in plan
    )
    with torch.no_grad():
        for bn_name, linear_name in plan.items():
            bn = model._modules[bn_name]
            linear = layers[linear_name]
            assert isinstance(bn, nn.BatchNorm1d)
            assert isinstance(linear, nn.Linear)
            _fold(bn, linear, bn_after_linear=names.index(bn_name) > names.index(linear_name))
    fused = nn.Sequential(layers)
    return fused.eval()


def _fold(bn: nn.BatchNorm1d, linear: nn.Linear, *, bn_after_linear: bool) -> None:
    scale, shift = _scale_shift(bn)
    weight = linear.weight.double()
    bias = (
        linear.bias.double() if linear.bias is not None else torch.zeros(weight.shape[0], dtype=torch.float64)
    )
    if bn_after_linear:  # BN(Wx + b) = s·(Wx + b) + t
        new_weight, new_bias = weight * scale[:, None], bias * scale + shift
    else:  # W·(s·x + t) + b
        new_weight, new_bias = weight * scale[None, :], bias + weight @ shift
    linear.weight.copy_(new_weight.to(linear.weight.dtype))
    if linear.bias is None:
        linear.bias = nn.Parameter(new_bias.to(linear.weight.dtype))
    else:
        linear.bias.copy_(new_bias.to(linear.bias.dtype))
