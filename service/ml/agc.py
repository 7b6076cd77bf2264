"""Adaptive gradient clipping (AGC, Brock et al. 2021b, "High-Performance Large-Scale Image
Recognition Without Normalization", §4), the clipping that lets normalizer-free networks train at
large batch sizes and learning rates.

Unit-wise, for each output unit i of a weight W (a row of a Linear's [out, in] weight; an output
channel of a Conv's [out, in, kh, kw]) with gradient G:

    G_i ← λ·(‖W_i‖* / ‖G_i‖)·G_i   if ‖G_i‖ / ‖W_i‖* > λ,   else G_i unchanged,

where ‖W_i‖* = max(‖W_i‖_F, ε) (ε = 1e-3: zero-initialised parameters can still move) and λ is the
clipping threshold. A vector or scalar parameter (a bias, a gain) is one unit: its whole norm, as the
authors' code (deepmind-research nfnets/agc_optax.py, `unitwise_norm`) does. The paper does not clip
the final classifier layer; `agc_parameters` leaves out bnlab's head (`out`).

Pure functions of tensors; the training loop calls `clip_gradients_` between backward and step.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

# ‖W_i‖* = max(‖W_i‖, AGC_EPS): the paper's and the authors' code's 1e-3.
AGC_EPS = 1e-3
# Guards the division where ‖G_i‖ = 0 (then nothing is clipped anyway), as the authors' 1e-6.
_NORM_FLOOR = 1e-6
# The classifier head that AGC leaves unclipped (bnlab's networks name it `out`).
HEAD = "out"


def unitwise_norm(x: torch.Tensor) -> torch.Tensor:
    """The Frobenius norm of each output unit of `x`, shaped to broadcast against it: over all but
    dim 0 for a matrix or conv kernel; the whole norm for a vector or scalar."""
    dims = None if x.dim() <= 1 else list(range(1, x.dim()))
    norm: torch.Tensor = torch.linalg.vector_norm(x, dim=dims, keepdim=dims is not None)
    return norm


def adaptive_clip(
    grad: torch.Tensor, param: torch.Tensor, clipping: float, eps: float = AGC_EPS
) -> torch.Tensor:
    """`grad` with each unit whose ‖G_i‖/max(‖W_i‖, eps) exceeds `clipping` rescaled to exactly that
    ratio; the other units unchanged. A new tensor; neither input is modified."""
    if clipping <= 0:
        raise ValueError(f"the AGC clipping threshold must be > 0, got {clipping}")
    max_norm = clipping * unitwise_norm(param.detach()).clamp(min=eps)
    grad_norm = unitwise_norm(grad)
    clipped = grad * (max_norm / grad_norm.clamp(min=_NORM_FLOOR))
    return torch.where(grad_norm > max_norm, clipped, grad)


@torch.no_grad()
def clip_gradients_(parameters: Iterable[nn.Parameter], clipping: float, eps: float = AGC_EPS) -> None:
    """Apply `adaptive_clip` to the `.grad` of each parameter, in place (those without one are skipped)."""
    for param in parameters:
        if param.grad is not None:
            param.grad.copy_(adaptive_clip(param.grad, param, clipping, eps))


def agc_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters AGC clips: all but the classifier head's (the paper leaves the final linear
    layer unclipped)."""
    return [p for name, p in model.named_parameters() if name.split(".")[0] != HEAD]
