"""Batch normalisation synchronised across data-parallel processes, on CPU as on GPU.

The article lists Keras' `synchronized` option: with a batch split across N processes, each
normalises with the statistics of the whole (global) batch rather than of its shard. PyTorch's
`nn.SyncBatchNorm` runs only on CUDA, so `SyncBatchNorm` here does the same with plain tensor ops and
one `all_reduce` per direction, which gloo (CPU) and NCCL (GPU) both provide:

- forward: per channel, the local sum, sum of squares and count are packed into one tensor and
  all-reduced; the global mean and biased variance normalise, the unbiased one (÷(N−1), N the global
  count) moves the running statistics exactly as BatchNorm over the global batch would
  (bn-semantics.md §1: momentum, None = cumulative average, eps, affine, track_running_stats);
- backward: the global statistics depend on every process's inputs, so the two per-channel sums the
  input gradient needs (Σ dy and Σ dy·(x − μ)) are all-reduced as well, as
  torch.nn.modules._functions.SyncBatchNorm does. γ and β gradients stay local: the data-parallel
  wrapper (DDP) all-reduces parameter gradients itself.

Without an initialised process group of more than one process, and in eval mode, the layer is plain
BatchNorm (running statistics in eval), so a model holding it trains and serves in one process too.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.nn.modules.batchnorm import _BatchNorm

ProcessGroup = Any  # torch.distributed.ProcessGroup; None = the default (world) group


def synchronising(group: ProcessGroup = None) -> bool:
    """Whether statistics are shared: a process group is up and holds more than this process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


class SyncBatchNorm(_BatchNorm):
    """BatchNorm over [N, C] or [N, C, H, W] whose training statistics cover the global batch.

    A subclass of `_BatchNorm` with its buffers and parameters, so checkpoints, fusion and the BN
    tools treat it as BN; it is not an `nn.BatchNorm1d`, so the hand-written MLP step (fastpath),
    whose statistics are local, declines a model that holds it.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: ProcessGroup = None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.process_group = process_group

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() not in (2, 4):
            raise ValueError(f"expected a 2D or 4D input, got {input.dim()}D")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and synchronising(self.process_group)):
            return super().forward(input)  # plain BN: one process, or eval with running statistics
        self._check_input_dim(input)
        mean, var, count = _global_moments(input, self.process_group)
        if self.track_running_stats:
            self._update_running_stats(mean, var, count)
        invstd = torch.rsqrt(var + self.eps).to(input.dtype)
        return _SyncBatchNormFunction.apply(  # type: ignore[no-any-return,no-untyped-call]
            input, self.weight, self.bias, mean.to(input.dtype), invstd, count, self.process_group
        )

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
        assert self.running_mean is not None
        assert self.running_var is not None
        assert self.num_batches_tracked is not None
        self.num_batches_tracked.add_(1)
        f = self.momentum if self.momentum is not None else 1.0 / int(self.num_batches_tracked)
        self.running_mean.mul_(1 - f).add_(mean.to(self.running_mean.dtype), alpha=f)
        unbiased = var * count / (count - 1)  # BN's running variance is Bessel-corrected (§1)
        self.running_var.mul_(1 - f).add_(unbiased.to(self.running_var.dtype), alpha=f)


def _dims(x: torch.Tensor) -> list[int]:
    return [0, *range(2, x.dim())]  # per channel: over the batch and any spatial dims


def _per_channel(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.reshape(1, -1, *([1] * (x.dim() - 2)))


def _global_moments(x: torch.Tensor, group: ProcessGroup) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(mean, biased variance, count) per channel over every process's shard, in float64.

    float64 because var = E[x²] − μ² cancels: in float32 a channel with a mean far larger than its
    spread would lose its variance; the sums are C numbers, so the wider type costs nothing to send.
    """
    dims = _dims(x)
    wide = x.detach().to(torch.float64)
    count = torch.full((1,), x.numel() // x.shape[1], dtype=torch.float64, device=x.device)
    packed = torch.cat([wide.sum(dims), (wide * wide).sum(dims), count])  # one tensor, one collective
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    channels = x.shape[1]
    total = int(packed[-1].item())
    if total < 2:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.shape}")
    mean = packed[:channels] / total
    var = (packed[channels : 2 * channels] / total - mean * mean).clamp_min(0.0)
    return mean, var, total


class _SyncBatchNormFunction(torch.autograd.Function):
    """y = (x − μ)·invstd·γ + β with μ, invstd of the global batch (`total` values per channel);
    the backward sums across processes what the statistics' gradient needs."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        mean: torch.Tensor,
        invstd: torch.Tensor,
        total: int,
        group: ProcessGroup,
    ) -> torch.Tensor:
        y = (x - _per_channel(mean, x)) * _per_channel(invstd, x)
        if weight is not None:
            y = y * _per_channel(weight, x)
        if bias is not None:
            y = y + _per_channel(bias, x)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.group, ctx.total = group, total
        return y

    @staticmethod
    def backward(
        ctx: Any, grad_y: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, None, None, None, None]:
        x, weight, mean, invstd = ctx.saved_tensors
        dims = _dims(x)
        xmu = x - _per_channel(mean, x)
        sum_dy, sum_dy_xmu = grad_y.sum(dims), (grad_y * xmu).sum(dims)
        grad_weight = sum_dy_xmu * invstd if weight is not None and ctx.needs_input_grad[1] else None
        grad_bias = sum_dy if ctx.needs_input_grad[2] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = _input_grad(grad_y, xmu, weight, invstd, sum_dy, sum_dy_xmu, ctx)
        return grad_x, grad_weight, grad_bias, None, None, None, None


def _input_grad(
    grad_y: torch.Tensor,
    xmu: torch.Tensor,
    weight: torch.Tensor | None,
    invstd: torch.Tensor,
    sum_dy: torch.Tensor,
    sum_dy_xmu: torch.Tensor,
    ctx: Any,
) -> torch.Tensor:
    """BN's input gradient with μ and σ² of the global batch: the two sums are global too."""
    channels = sum_dy.shape[0]
    packed = torch.cat([sum_dy, sum_dy_xmu])
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=ctx.group)
    mean_dy = packed[:channels] / ctx.total
    mean_dy_xmu = packed[channels:] / ctx.total
    scale = invstd if weight is None else invstd * weight
    centred = grad_y - _per_channel(mean_dy, grad_y) - xmu * _per_channel(invstd * invstd * mean_dy_xmu, xmu)
    return centred * _per_channel(scale, grad_y)
