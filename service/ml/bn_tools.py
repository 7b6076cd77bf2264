"""Inference-side BatchNorm tools: buffer summaries, PreciseBN recalibration, batch-statistics inference.

PreciseBN (Wu & Johnson 2021, bn-semantics.md §5) recomputes the population statistics of every BN
layer over many training batches with frozen weights, instead of trusting the exponential moving
average accumulated during training. The model runs in train mode, as in both reference tools, so
each BN layer sees inputs normalised by the batch statistics of the layers before it. Two estimators:

- `mean_of_batches` — `torch.optim.swa_utils.update_bn`: the plain mean over batches of the batch
  means and of the **unbiased** batch variances (what BN's `momentum=None` cumulative average gives).
- `population` — fvcore's `update_bn_stats`: the mean and the **population** variance (÷N) of all
  the samples seen, batches weighted by their size: E[x²] − E[x]² accumulated across batches.

They disagree most on small batches (the unbiased batch variance overstates, and the spread between
batch means is counted only by `population`).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from service.ml.norms import uses_batch_statistics

Estimator = Literal["population", "mean_of_batches"]
ESTIMATORS: tuple[Estimator, ...] = ("population", "mean_of_batches")


@dataclass(frozen=True)
class Summary:
    min: float
    max: float
    mean: float
    std: float
    histogram_edges: list[float]  # bins + 1 edges
    histogram_counts: list[int]


@dataclass(frozen=True)
class BNLayerStats:
    name: str
    num_features: int
    eps: float
    momentum: float | None
    affine: bool
    track_running_stats: bool
    num_batches_tracked: int | None
    running_mean: Summary | None
    running_var: Summary | None
    weight: Summary | None  # γ
    bias: Summary | None  # β


def batch_norm_layers(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def summarize(values: torch.Tensor, bins: int = 20) -> Summary:
    v = values.detach().double().flatten()
    lo, hi = v.min().item(), v.max().item()
    if hi == lo:  # torch.histc needs a non-empty range
        lo, hi = lo - 0.5, hi + 0.5
    counts = torch.histc(v, bins=bins, min=lo, max=hi)
    edges = torch.linspace(lo, hi, bins + 1, dtype=torch.float64)
    return Summary(
        min=v.min().item(),
        max=v.max().item(),
        mean=v.mean().item(),
        std=v.std(unbiased=False).item(),
        histogram_edges=edges.tolist(),
        histogram_counts=[int(c) for c in counts.tolist()],
    )


def bn_stats(model: nn.Module, bins: int = 20) -> list[BNLayerStats]:
    """Per BN layer: its constants, `num_batches_tracked`, and summaries of buffers and γ/β."""
    layers = []
    for name, bn in batch_norm_layers(model):
        tracked = bn.num_batches_tracked
        layers.append(
            BNLayerStats(
                name=name,
                num_features=bn.num_features,
                eps=bn.eps,
                momentum=bn.momentum,
                affine=bn.affine,
                track_running_stats=bn.track_running_stats,
                num_batches_tracked=None if tracked is None else int(tracked.item()),
                running_mean=None if bn.running_mean is None else summarize(bn.running_mean, bins),
                running_var=None if bn.running_var is None else summarize(bn.running_var, bins),
                weight=summarize(bn.weight, bins) if bn.weight is not None else None,
                bias=summarize(bn.bias, bins) if bn.bias is not None else None,
            )
        )
    return layers


class _Accumulator:
    """Per-channel statistics of one BN layer's inputs over the recalibration batches, in float64."""

    def __init__(self) -> None:
        self.batches = 0
        self.samples = 0
        self.sum_of_means: torch.Tensor | float = 0.0
        self.sum_of_unbiased_vars: torch.Tensor | float = 0.0
        self.sum: torch.Tensor | float = 0.0
        self.sum_of_squares: torch.Tensor | float = 0.0

    def add(self, x: torch.Tensor) -> None:
        # BatchNorm1d's channels are dim 1; statistics run over the batch (and a length dim, if any).
        flat = x.detach().double().transpose(0, 1).reshape(x.shape[1], -1)
        n = flat.shape[1]
        self.batches += 1
        self.samples += n
        self.sum_of_means = self.sum_of_means + flat.mean(dim=1)
        self.sum_of_unbiased_vars = self.sum_of_unbiased_vars + flat.var(dim=1, unbiased=True)
        # Moments about the first batch's mean would be more robust; BN inputs are O(1), so the
        # float64 E[x²] − E[x]² below loses nothing measurable.
        self.sum = self.sum + flat.sum(dim=1)
        self.sum_of_squares = self.sum_of_squares + flat.square().sum(dim=1)

    def result(self, estimator: Estimator) -> tuple[torch.Tensor, torch.Tensor]:
        if estimator == "mean_of_batches":
            return (
                torch.as_tensor(self.sum_of_means) / self.batches,
                torch.as_tensor(self.sum_of_unbiased_vars) / self.batches,
            )
        mean = torch.as_tensor(self.sum) / self.samples
        return mean, (torch.as_tensor(self.sum_of_squares) / self.samples - mean.square()).clamp_min(0.0)


@dataclass(frozen=True)
class RecalibrationResult:
    model: nn.Module  # a recalibrated copy, in eval mode
    batches: int
    samples: int


def recalibrate(
    model: nn.Module, batches: Iterable[torch.Tensor], estimator: Estimator
) -> RecalibrationResult:
    """A copy of `model` whose BN running statistics are recomputed over `batches` (PreciseBN).

    Weights are frozen (no gradient, no optimizer); only `running_mean`, `running_var` and
    `num_batches_tracked` change, and only in the copy. Batches of a single sample are refused:
    BN cannot normalise one value per channel in train mode.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; expected one of {', '.join(ESTIMATORS)}")
    copy_ = copy.deepcopy(model)
    layers = batch_norm_layers(copy_)
    if not layers:
        raise ValueError(
            "the model has no BatchNorm layer to recalibrate (only the norm kinds batch, batch_renorm "
            "and ghost keep running statistics; an rnn's recurrent BN keeps them per time step and is "
            "not recalibrated)"
        )
    if any(bn.running_mean is None for _, bn in layers):
        raise ValueError(
            "the model's BatchNorm layers keep no running statistics (track_running_stats=false)"
        )
    accumulators = {name: _Accumulator() for name, _ in layers}
    handles = [
        bn.register_forward_pre_hook(lambda _m, args, acc=accumulators[name]: acc.add(args[0]))
        for name, bn in layers
    ]
    count = samples = 0
    copy_.train()  # on purpose: each BN layer normalises with batch statistics while being measured
    try:
        with torch.no_grad():
            for x in batches:
                if x.shape[0] < 2:
                    raise ValueError("recalibration batches need at least 2 samples")
                copy_(x)
                count += 1
                samples += x.shape[0]
    finally:
        for handle in handles:
            handle.remove()
    if count == 0:
        raise ValueError("recalibration needs at least one batch")
    for name, bn in layers:
        mean, var = accumulators[name].result(estimator)
        assert bn.running_mean is not None
        assert bn.running_var is not None
        assert bn.num_batches_tracked is not None
        bn.running_mean.copy_(mean.to(bn.running_mean.dtype))
        bn.running_var.copy_(var.to(bn.running_var.dtype))
        bn.num_batches_tracked.fill_(count)
    return RecalibrationResult(model=copy_.eval(), batches=count, samples=samples)


def predict_proba_batch_stats(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """Softmax probabilities with BN in train mode: normalised by THIS batch's statistics.

    For teaching: the same inputs give other answers than in eval mode, and a sample's answer
    depends on the rest of its batch. Runs on a copy, so the stored running buffers never move.
    Only the layers that use batch statistics switch to train mode: dropout stays off, so the
    answer differs from eval mode by the normalisation alone.
    """
    if inputs.shape[0] < 2 and any(uses_batch_statistics(m) for m in model.modules()):
        raise ValueError(
            "batch statistics need at least 2 samples (one value per channel cannot be normalised)"
        )
    copy_ = copy.deepcopy(model).eval()
    for module in copy_.modules():
        if uses_batch_statistics(module):
            module.train()
    with torch.no_grad():
        logits: torch.Tensor = copy_(inputs.to(torch.float32))
    return logits.softmax(dim=1)
