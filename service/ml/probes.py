"""Internal covariate shift, measured: how the input of each normalisation slot moves during training.

The article's central concept is that a layer's input distribution shifts as the layers before it
learn. `probe_slot_inputs` makes that visible: on a fixed probe batch (the same samples every epoch),
it records the mean and standard deviation of what enters each normalisation slot, before it is
normalised. Networks without normalisation have the same slots (identity modules, see
`nets.norm_slots`), so the curves of a run with BN and one without compare layer by layer.

The probe runs in eval mode under `inference_mode`: it never updates BN's running statistics, never
draws from an RNG (dropout is off in eval), and leaves gradients alone, so a probed run trains exactly
as an unprobed one would. It restores the mode the model was in.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from types import MethodType
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

# Samples in the probe batch: enough for stable moments, cheap next to an epoch (one eval forward).
PROBE_SAMPLES = 256


@dataclass(frozen=True)
class SlotStatistics:
    epoch: int  # 0 = the freshly initialised network, k = after epoch k
    layer: str  # the slot's module name in the network, e.g. "bn1"
    input_mean: float  # over every sample and unit of the slot's input on the probe batch
    input_std: float  # population standard deviation over the same values


# Each slot's input on the probe batch, by slot name (capture_slot_inputs).
SlotInputs = dict[str, torch.Tensor]


def probe_slot_inputs(
    model: nn.Module, slots: Sequence[tuple[str, nn.Module]], probe: torch.Tensor, epoch: int
) -> tuple[SlotStatistics, ...]:
    """Mean and std of each slot's input when `model` (in eval mode) sees the float batch `probe`."""
    return slot_statistics(capture_slot_inputs(model, slots, probe), slots, epoch)


def capture_slot_inputs(
    model: nn.Module, slots: Sequence[tuple[str, nn.Module]], probe: torch.Tensor
) -> SlotInputs:
    """Each slot's input when `model`, in eval mode, sees the float batch `probe`; the model's mode is
    restored. The slot statistics and the percentiles probe both read them: one forward pass."""
    if not slots:
        return {}
    was_training = model.training
    try:
        model.eval()  # on purpose: train mode would move BN's running statistics
        with torch.inference_mode():
            return _last_slot_inputs(model, slots, probe)
    finally:
        model.train(was_training)


def slot_statistics(
    inputs: SlotInputs, slots: Sequence[tuple[str, nn.Module]], epoch: int
) -> tuple[SlotStatistics, ...]:
    """The mean and population std of each slot's captured input, in the slots' order."""
    seen: dict[str, tuple[float, float]] = {}
    for name, values in inputs.items():
        wide = values.double()
        seen[name] = (wide.mean().item(), wide.std(unbiased=False).item())
    return tuple(SlotStatistics(epoch, name, *seen[name]) for name, _ in slots if name in seen)


def _last_slot_inputs(
    model: nn.Module, slots: Sequence[tuple[str, nn.Module]], x: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Each slot's input when `model` sees `x` (call it in inference mode, the model in eval mode);
    a slot called once per time step keeps its last step's, as the probes report. Kept, not
    measured, in the hooks: a recurrent cell calls each slot at every step, and measuring all 28
    steps' inputs to keep the last cost an LSTM's probes 0.19 s an epoch. Nothing in bnlab's networks
    changes a slot's input in place after the slot has read it."""
    seen: dict[str, torch.Tensor] = {}

    def recorder(name: str) -> Any:
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            seen[name] = args[0].detach()

        return hook

    handles = [module.register_forward_pre_hook(recorder(name)) for name, module in slots]
    try:
        model(x)
    finally:
        for handle in handles:
            handle.remove()
    return seen


# --- Why BN helps, measured (issue 21.3) -------------------------------------------------------------
#
# Five more probes, each a switch of the run spec (train.probes) and each recorded on the same fixed
# probe batch after every epoch and at initialisation (epoch 0). Their results are generic rows
# (epoch, probe, layer, name, value): one table and one route serve them all. docs/probes.md gives
# each one's formula, citation and measured cost.
#
# None of them changes training: `_untouched` forks the global RNG (the caller's stream is as it
# was), snapshots every buffer (BN's running statistics, noisy BN's noise counter, batch renorm's
# step) and restores it after each forward, gradients are taken with torch.autograd.grad (no
# parameter's .grad is written), parameters moved by the smoothness probe are copied back exactly,
# and the model's mode is restored.

MODEL = "model"  # the `layer` of a value about the whole network (a fitted rate, an accuracy)
# Santurkar et al. §3.2: steps along −∇L of these multiples of the learning rate.
STEP_FRACTIONS = (0.05, 0.1, 0.2, 0.3, 0.4)
PERCENTILES = (15, 50, 85)  # the BN paper's Fig. 1(b, c)
# |γ| below this counts as "near zero": the unit's normalised signal (unit variance) reaches the next
# layer with a standard deviation under 1% of BN's initial γ = 1; absolute, so that a layer whose γ
# are all zero counts fully (a threshold relative to max|γ| would be 0 there).
GAMMA_NEAR_ZERO = 0.01
# statistics_gap's exact population statistics: over the first this-many samples of the training split.
STATISTICS_SAMPLES = 8192
# ... passed through the network this many at a time, unless the caller sizes the chunk to the
# network as validation does (training.evaluation_batch_size: a ResNet-20's 167 took 2.8 s per 2,048
# samples where 1,024 took 6.0 s, its activations no longer in the caches).
STATISTICS_CHUNK = 1024

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ProbeValue:
    epoch: int  # 0 = the freshly initialised network, k = after epoch k
    probe: str  # one of config.PROBE_NAMES
    layer: str  # a module name (fc1, bn3, blocks.2.bn1, …) or MODEL
    name: str  # what was measured, e.g. grad_norm, p15, near_zero_fraction
    value: float


@contextmanager
def _untouched(model: nn.Module) -> Iterator[Callable[[], None]]:
    """Run a probe without leaving a trace: yields `reset()`, which puts every buffer back as it was
    (call it before each train-mode forward so that one forward never sees another's updates)."""
    saved = [(buffer, buffer.detach().clone()) for buffer in model.buffers()]

    def reset() -> None:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)

    was_training = model.training
    device = next(model.parameters(), torch.empty(0)).device
    devices = [device.index or 0] if device.type == "cuda" else []
    # Only the reporting rank of a data-parallel run probes: a SyncBatchNorm in train mode would wait
    # in an all_reduce for ranks that never come. Here it normalises as BatchNorm, over the probe batch.
    # (distributed.SyncBatchNorm and torch's both keep a `process_group`.)
    synced = [m for m in model.modules() if isinstance(m, _BatchNorm) and hasattr(m, "process_group")]
    for m in synced:
        m.forward = MethodType(_BatchNorm.forward, m)  # type: ignore[method-assign]
    with torch.random.fork_rng(devices=devices):
        try:
            yield reset
        finally:
            reset()
            model.train(was_training)
            for m in synced:
                del m.forward


def _weighted_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The Linear and Conv layers, input to output (module order), by module name."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)]


def _layer_weights(module: nn.Module) -> list[nn.Parameter]:
    # A plain layer's `weight`; under weight_norm, its parametrization's g and v (the trained tensors).
    return [p for name, p in module.named_parameters() if not name.endswith("bias") and p.requires_grad]


def _norm(tensors: Sequence[torch.Tensor]) -> float:
    # Each norm in float64 by one kernel, without a float64 copy of the tensor and of its squares.
    norms = [float(torch.linalg.vector_norm(t.detach(), dtype=torch.float64)) for t in tensors]
    return math.sqrt(sum(n * n for n in norms))


def fit_log_growth(norms: Sequence[float]) -> tuple[float, float]:
    """(slope, growth per layer) of the least-squares line log‖g_l‖ = a + slope·l, l = 1..L. Growth per
    layer is exp(−slope): the factor by which the norm grows from one layer to the one before it
    (towards the input), as Yang et al. (2019) find at initialisation of deep BN networks. Layers with
    a zero norm are left out; fewer than two points give (nan, nan)."""
    points = [(float(i), math.log(v)) for i, v in enumerate(norms, start=1) if v > 0 and math.isfinite(v)]
    if len(points) < 2:
        return math.nan, math.nan
    xs, ys = zip(*points, strict=True)
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    return slope, math.exp(-slope)


def _loss_and_gradient(
    model: nn.Module, params: list[nn.Parameter], x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn
) -> tuple[float, list[torch.Tensor]]:
    loss = loss_fn(model(x), y)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    filled = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]
    return float(loss.detach()), filled


def probe_gradients(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, epoch: int, loss_fn: LossFn = F.cross_entropy
) -> tuple[ProbeValue, ...]:
    """‖∂L/∂W_l‖ and ‖W_l‖ of every Linear/Conv layer for the loss on the probe batch, computed in
    train mode (BN normalises with the probe batch's statistics, as Yang et al. measure at
    initialisation), and the fitted log-linear growth of the gradient norm with depth: over the hidden
    layers (all but the first and the last) when there are at least four layers, else over all."""
    layers = _weighted_layers(model)
    if not layers:
        return ()
    per_layer = [_layer_weights(m) for _, m in layers]
    params = [p for ps in per_layer for p in ps]
    with _untouched(model) as reset:
        reset()
        model.train()
        loss, grads = _loss_and_gradient(model, params, x, y, loss_fn)
    values: list[ProbeValue] = []
    grad_norms: list[float] = []
    at = 0
    for depth, ((name, module), ps) in enumerate(zip(layers, per_layer, strict=True), start=1):
        g = _norm(grads[at : at + len(ps)])
        at += len(ps)
        grad_norms.append(g)
        weight = module.weight if isinstance(module.weight, torch.Tensor) else ps[0]
        values += [
            ProbeValue(epoch, "gradients", name, "grad_norm", g),
            ProbeValue(epoch, "gradients", name, "weight_norm", _norm([weight])),
            ProbeValue(epoch, "gradients", name, "depth", float(depth)),  # 1 = the input layer
        ]
    fitted = grad_norms[1:-1] if len(grad_norms) >= 4 else grad_norms
    slope, growth = fit_log_growth(fitted)
    values += [
        ProbeValue(epoch, "gradients", MODEL, "loss", loss),
        ProbeValue(epoch, "gradients", MODEL, "log_slope", slope),
        ProbeValue(epoch, "gradients", MODEL, "growth_per_layer", growth),
    ]
    return tuple(values)


def probe_smoothness(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    lr: float,
    epoch: int,
    fractions: Sequence[float] = STEP_FRACTIONS,
    loss_fn: LossFn = F.cross_entropy,
) -> tuple[ProbeValue, ...]:
    """The loss landscape along the gradient (Santurkar et al. 2018, §3.2): with g = ∇L(w) on the probe
    batch (train mode), for each step η = f·lr (f in `fractions`) the loss L(w − ηg) and the gradient
    change ‖∇L(w − ηg) − g‖. Records the range of the losses (min, max, the unmoved loss included),
    the largest gradient change, and the effective β-smoothness max_η ‖∇L(w − ηg) − g‖ / ‖ηg‖. For a
    quadratic loss that ratio is ‖Hg‖/‖g‖ ≤ ‖H‖₂, with equality when g is a top eigenvector of H."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params or not fractions:
        return ()
    saved = [p.detach().clone() for p in params]
    with _untouched(model) as reset:
        model.train()
        reset()
        loss0, g = _loss_and_gradient(model, params, x, y, loss_fn)
        g_norm = _norm(g)
        losses, changes, betas = [loss0], [], []
        try:
            for f in fractions:
                eta = f * lr
                with torch.no_grad():
                    for p, p0, gi in zip(params, saved, g, strict=True):
                        p.copy_(p0 - eta * gi)
                reset()
                loss, g2 = _loss_and_gradient(model, params, x, y, loss_fn)
                change = _norm([a - b for a, b in zip(g2, g, strict=True)])
                losses.append(loss)
                changes.append(change)
                betas.append(change / (eta * g_norm) if g_norm > 0 else 0.0)
        finally:
            with torch.no_grad():
                for p, p0 in zip(params, saved, strict=True):
                    p.copy_(p0)
    return tuple(
        ProbeValue(epoch, "smoothness", MODEL, name, value)
        for name, value in (
            ("loss", loss0),
            ("loss_min", min(losses)),
            ("loss_max", max(losses)),
            ("grad_norm", g_norm),
            ("grad_change_max", max(changes)),
            ("beta", max(betas)),
            ("lr", lr),
        )
    )


def _quantiles(values: torch.Tensor, qs: Sequence[float]) -> list[float]:
    """The `qs` quantiles of every value, exactly as torch.quantile computes them over the values in
    float64 (linear interpolation between the two order statistics around rank q·(n − 1); NaN if any
    value is NaN), without its limit of 2**24 values. numpy selects the order statistics (a partial
    sort, np.partition) in the values' own dtype, which orders them as float64 would: for a ResNet's
    slot input of 3.2 million float32 values it took 48 ms where a full sort took 127 ms, and a
    full sort in turn a quarter of numpy's quantile (which selects in float64)."""
    flat = values.detach().reshape(-1).cpu().numpy()
    if flat.size == 0 or np.isnan(flat).any():
        return [math.nan] * len(qs)
    ranks = torch.tensor(qs, dtype=torch.float64) * (flat.size - 1)
    below, above = ranks.long().numpy(), ranks.ceil().long().numpy()
    selected = np.partition(flat, np.union1d(below, above))  # a copy: the captured inputs stay as they are
    low = torch.from_numpy(selected[below]).double()
    high = torch.from_numpy(selected[above]).double()
    return low.lerp(high, torch.from_numpy(ranks.numpy() - below)).tolist()


def probe_percentiles(
    model: nn.Module,
    slots: Sequence[tuple[str, nn.Module]],
    x: torch.Tensor,
    epoch: int,
    inputs: SlotInputs | None = None,
) -> tuple[ProbeValue, ...]:
    """The 15th, 50th and 85th percentiles of each slot's input over every sample and unit of the probe
    batch (eval mode, as probe_slot_inputs), the BN paper's Fig. 1(b, c) (there for one sigmoid input).
    `inputs`: the slot inputs on `x` as capture_slot_inputs took them from the model as it is now."""
    if not slots:
        return ()
    if inputs is None:
        with _untouched(model):
            inputs = capture_slot_inputs(model, slots, x)
    quantiles = [q / 100 for q in PERCENTILES]
    seen = {name: _quantiles(values, quantiles) for name, values in inputs.items()}
    return tuple(
        ProbeValue(epoch, "percentiles", name, f"p{q}", v)
        for name, _ in slots
        if name in seen
        for q, v in zip(PERCENTILES, seen[name], strict=True)
    )


def _gains(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Each normalisation layer's learnt scale γ (a 1-D `weight`), by module name."""
    return [
        (name, m.weight)
        for name, m in model.named_modules()
        if "Norm" in type(m).__name__
        and isinstance(getattr(m, "weight", None), torch.Tensor)
        and m.weight.dim() == 1
    ]


def probe_gamma(model: nn.Module, epoch: int, threshold: float = GAMMA_NEAR_ZERO) -> tuple[ProbeValue, ...]:
    """Per normalisation layer: the fraction of its γ with |γ| < `threshold` (Frankle et al. 2021 find
    many γ driven towards zero), and the mean |γ|. Reads the parameters only: no forward pass."""
    values: list[ProbeValue] = []
    for name, gamma in _gains(model):
        magnitude = gamma.detach().abs().double()
        near_zero = float((magnitude < threshold).double().mean())
        values += [
            ProbeValue(epoch, "gamma", name, "near_zero_fraction", near_zero),
            ProbeValue(epoch, "gamma", name, "abs_mean", float(magnitude.mean())),
        ]
    return tuple(values)


def _running_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    # One running statistic per channel: an rnn's recurrent BN keeps one per time step ([steps, C]),
    # against which one population over all steps says nothing; its layers are left out.
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(getattr(m, "running_mean", None), torch.Tensor)
        and isinstance(getattr(m, "running_var", None), torch.Tensor)
        and getattr(m, "running_mean").dim() == 1  # noqa: B009  # a buffer
    ]


def _norm_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if "Norm" in type(m).__name__]


def probe_statistics_gap(
    model: nn.Module,
    train_x: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    epoch: int,
    chunk: int = STATISTICS_CHUNK,
) -> tuple[ProbeValue, ...]:
    """Wu & Johnson (2021)'s two discrepancies of BN between training and inference.

    Per BN layer: the exact per-channel mean μ and (unbiased) variance σ² of its input over `train_x`
    (the runs pass the first STATISTICS_SAMPLES of the training split), with the network in eval mode
    (the layers below normalise with their running statistics, as at inference), against its
    running_mean m and running_var v: mean_gap = mean_c |m_c − μ_c| / √(σ²_c + ε) (the error in units
    of the input's std), var_gap = mean_c |v_c − σ²_c| / (σ²_c + ε) (relative), and their maxima.

    For the network: the accuracy and loss on the probe batch in eval mode and in "train mode" (every
    normalisation layer normalising with the probe batch's own statistics, the rest in eval mode: no
    dropout), and train − eval accuracy."""
    layers = _running_layers(model)
    values: list[ProbeValue] = []
    with _untouched(model) as reset:
        if layers and len(train_x) > 1:
            sums: dict[str, list[Any]] = {name: [0.0, 0.0, 0] for name, _ in layers}

            def recorder(name: str) -> Any:
                def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
                    # Per channel (dim 1), over the samples and any positions, in float64: one copy,
                    # squared in place (the input's channels-last or default layout as it comes).
                    t = args[0].detach().to(torch.float64, copy=True)
                    dims = [0, *range(2, t.dim())]
                    acc = sums[name]
                    acc[0] = acc[0] + t.sum(dim=dims)
                    acc[1] = acc[1] + t.square_().sum(dim=dims)
                    acc[2] += t.numel() // t.shape[1]

                return hook

            handles = [m.register_forward_pre_hook(recorder(name)) for name, m in layers]
            model.eval()
            try:
                with torch.inference_mode():
                    for part in torch.split(train_x, chunk):
                        model(part)
            finally:
                for handle in handles:
                    handle.remove()
            for name, m in layers:
                total, squares, n = sums[name]
                mean = total / n
                var = ((squares - n * mean.square()) / (n - 1)).clamp_min(0.0)
                eps = float(getattr(m, "eps", 0.0))
                running_mean = getattr(m, "running_mean").detach().double()  # noqa: B009  # a buffer
                running_var = getattr(m, "running_var").detach().double()  # noqa: B009
                mean_gap = (running_mean - mean).abs() / (var + eps).sqrt()
                var_gap = (running_var - var).abs() / (var + eps)
                values += [
                    ProbeValue(epoch, "statistics_gap", name, "mean_gap", float(mean_gap.mean())),
                    ProbeValue(epoch, "statistics_gap", name, "var_gap", float(var_gap.mean())),
                    ProbeValue(epoch, "statistics_gap", name, "mean_gap_max", float(mean_gap.max())),
                    ProbeValue(epoch, "statistics_gap", name, "var_gap_max", float(var_gap.max())),
                ]
        results: dict[str, float] = {}
        for mode in ("eval", "train"):
            model.eval()
            if mode == "train":
                for m in _norm_modules(model):
                    m.train()
            reset()
            with torch.inference_mode():
                logits = model(x)
            results[f"{mode}_accuracy"] = float((logits.argmax(dim=1) == y).double().mean())
            results[f"{mode}_loss"] = float(F.cross_entropy(logits, y))
    results["accuracy_gap"] = results["train_accuracy"] - results["eval_accuracy"]
    values += [ProbeValue(epoch, "statistics_gap", MODEL, k, v) for k, v in results.items()]
    return tuple(values)


@dataclass(frozen=True)
class EpochProbes:
    """The probes a run switched on, with what they look at: the probe batch (inputs and labels), the
    norm slots, and the training samples over which statistics_gap takes population statistics."""

    enabled: frozenset[str]
    x: torch.Tensor
    y: torch.Tensor
    slots: Sequence[tuple[str, nn.Module]]
    train_x: torch.Tensor
    chunk: int = STATISTICS_CHUNK  # statistics_gap's samples per forward pass over train_x

    def __call__(
        self, model: nn.Module, epoch: int, lr: float, slot_inputs: SlotInputs | None = None
    ) -> tuple[ProbeValue, ...]:
        """The enabled probes' values; `slot_inputs`: the slots' inputs on the probe batch, captured
        from the model as it is now (capture_slot_inputs), which the percentiles then reuse."""
        values: list[ProbeValue] = []
        if "gradients" in self.enabled:
            values += probe_gradients(model, self.x, self.y, epoch)
        if "smoothness" in self.enabled:
            values += probe_smoothness(model, self.x, self.y, lr, epoch)
        if "percentiles" in self.enabled:
            values += probe_percentiles(model, self.slots, self.x, epoch, slot_inputs)
        if "gamma" in self.enabled:
            values += probe_gamma(model, epoch)
        if "statistics_gap" in self.enabled:
            values += probe_statistics_gap(model, self.train_x, self.x, self.y, epoch, self.chunk)
        return tuple(values)
