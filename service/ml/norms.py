"""Every normalisation layer a network can use, built from a NormConfig (bn-semantics.md §1 and §3).

PyTorch's own modules serve `batch` (BatchNorm1d/2d), `layer` (LayerNorm; GroupNorm(1, C) on conv
features, i.e. statistics over (C, H, W) with a per-channel γ, β), `group` (GroupNorm) and `instance`
(InstanceNorm2d). Three kinds are small modules here, each following §3 to the letter:

- `BatchRenorm`: BN corrected by r = σ_B/σ and d = (μ_B − μ)/σ, computed without gradient and clipped
  to [1/rmax, rmax] and [−dmax, dmax]; the limits follow the paper's warm-up schedule, driven by the
  step count kept in the `num_batches_tracked` buffer, so a resumed run continues the schedule.
- `GhostBatchNorm`: BN applied to each virtual sub-batch, with shared γ, β and running statistics.
- `BatchLayerNorm` (Ziaee & Çano 2022, as in the authors' code): a mix of the batch-normalised and
  the layer-normalised input weighted by the inverse batch size; population statistics are per-epoch
  averages of the batch statistics, with Bessel's correction (`end_epoch` finalises them).

`weight` (weight normalisation) is not a layer: `nets` reparametrises the Linear/Conv itself.

BatchRenorm and GhostBatchNorm subclass `_BatchNorm` and keep its buffers: in eval mode they ARE
batch normalisation with running statistics, so fusion, bn-stats and recalibration treat them as BN.

The normalisers that came after BN (docs/normalizers.md has each formula and its paper):

- `FilterResponseNorm` (`frn`, Singh & Krishnan 2020): each sample's channel divided by its own mean
  square, then γ, β and the thresholded linear unit max(y, τ), which replaces the block's activation.
- `ScaledWeightStandardization` (`ws`, Brock et al. 2021a): no norm layer; each hidden Linear/Conv's
  weights are standardised per output unit, with the NF-ResNet gain γ of the activation before it.
- `NoisyBatchNorm` (`noisy_batch`, Santurkar et al. 2018): BN, then noise whose mean and scale change
  at every training step, drawn from a stream keyed on the run's seed, the layer and the step.
- Example weighing (`example_weight` α, Summers & Dinneen 2020): BN kinds at eval mix each example's
  own statistics into the population's with weight α (`_BatchNormAnyDim._eval`).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import parametrize

from service.ml.config import NormConfig

# The authors' BLN mixes x_f·(1/B − 1e-4) + x_b·(1 − 1/B − 1e-4): these constants are theirs.
BLN_OFFSET = 1e-4
# Scaled WS: the NF-ResNet gain γ of each activation, so that γ·act(x) of a unit Gaussian x has unit
# variance. ReLU's is the paper's closed form √2/√(1 − 1/π) (Brock et al. 2021a, §4); the others are
# the constants of the authors' code (deepmind-research nfnets/base.py), computed numerically there.
NF_GAMMA: dict[str, float] = {
    "relu": math.sqrt(2 / (1 - 1 / math.pi)),
    "gelu": 1.7015043497085571,
    "tanh": 1.5939117670059204,
    "sigmoid": 4.803835391998291,
}
# Scaled WS divides by √max(N·Var(W), 1e-4), as the authors' WSConv2D (its `eps`).
WS_EPS = 1e-4
# Seeds of torch generators are taken to 63 bits (an int64 buffer holds them).
_SEED_BITS = (1 << 63) - 1


def make_norm(cfg: NormConfig, channels: int, *, spatial: bool, positions: int = 1) -> nn.Module:
    """The normalisation slot of one block: `channels` features, [N, C] (mlp) or [N, C, H, W] (cnn)
    with `positions` = H·W values per channel and sample."""
    module = _build(cfg, channels, spatial, positions)
    # Keras' center/scale may learn only β or only γ: drop the other (F.* functions take None).
    for name, learned in (("weight", cfg.learns_gamma), ("bias", cfg.learns_beta)):
        if not learned and getattr(module, name, None) is not None:
            module.register_parameter(name, None)
    return module


def _build(cfg: NormConfig, channels: int, spatial: bool, positions: int) -> nn.Module:
    # With center/scale differing, build the affine module and drop the parameter not learned.
    affine = cfg.learns_gamma or cfg.learns_beta
    kind = cfg.kind
    if kind in ("none", "weight"):
        return nn.Identity()  # a named slot all the same, so probes see every block's input
    if kind == "batch" and cfg.example_weight > 0:  # BN whose eval weighs the example in
        return WeighedBatchNorm(channels, cfg)
    if kind == "batch":
        bn_type = nn.BatchNorm2d if spatial else nn.BatchNorm1d
        return bn_type(channels, cfg.eps, cfg.momentum, affine, cfg.track_running_stats)
    if kind == "noisy_batch":
        return NoisyBatchNorm(channels, cfg)
    if kind == "frn":
        return FilterResponseNorm(channels, cfg)
    if kind == "ws":
        return nn.Identity()  # the weights are standardised instead (standardize_weights)
    if kind == "layer":
        # GroupNorm(1, C) ≡ LayerNorm over (C, H, W) (oracle 10), with γ, β per channel as in BN.
        if spatial:
            return nn.GroupNorm(1, channels, cfg.eps, affine)
        return nn.LayerNorm(channels, cfg.eps, elementwise_affine=affine)
    if kind == "group":
        if channels % cfg.num_groups:
            raise ValueError(f"num_groups {cfg.num_groups} does not divide the width {channels}")
        if channels // cfg.num_groups * positions < 2:  # a group of one value has no variance
            raise ValueError(f"num_groups {cfg.num_groups} leaves one value per group at width {channels}")
        return nn.GroupNorm(cfg.num_groups, channels, cfg.eps, affine)
    if kind == "instance":
        if not spatial:
            raise ValueError("instance normalisation needs spatial dimensions: use it with arch 'cnn'")
        if positions < 2:
            raise ValueError("instance normalisation needs feature maps larger than 1×1 (fewer blocks)")
        if cfg.momentum is None and cfg.track_running_stats:  # InstanceNorm has no cumulative average
            raise ValueError("instance normalisation with running statistics needs a momentum, not null")
        return nn.InstanceNorm2d(channels, cfg.eps, cfg.momentum or 0.0, affine, cfg.track_running_stats)
    if kind == "batch_renorm":
        return BatchRenorm(channels, cfg)
    if kind == "ghost":
        return GhostBatchNorm(channels, cfg)
    if kind == "batch_layer":
        return BatchLayerNorm(channels, cfg)
    raise ValueError(f"unknown norm kind {kind!r}")


def _channel_dims(x: torch.Tensor) -> list[int]:
    return [0, *range(2, x.dim())]  # statistics per channel over the batch and any spatial dims


def _per_channel(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.reshape(1, -1, *([1] * (x.dim() - 2)))


def _check_values_per_channel(x: torch.Tensor) -> int:
    n = x.numel() // x.shape[1]
    if n < 2:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.shape}")
    return n


class _BatchNormAnyDim(_BatchNorm):
    """BN over [N, C] or [N, C, H, W]: our blocks feed one or the other. At eval, with running
    statistics and `example_weight` α > 0, each example is normalised by statistics that mix its own
    (over its H·W positions) with the population's (Summers & Dinneen 2020, `_example_weighed`)."""

    example_weight: float = 0.0

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() not in (2, 4):
            raise ValueError(f"expected a 2D or 4D input, got {input.dim()}D")

    def _affine(self, y: torch.Tensor) -> torch.Tensor:
        if self.weight is not None:
            y = y * _per_channel(self.weight, y)
        if self.bias is not None:
            y = y + _per_channel(self.bias, y)
        return y

    def _eval(self, x: torch.Tensor) -> torch.Tensor:
        # Eval with running statistics is plain BN: this is why these kinds fold like BN.
        use_batch = self.running_mean is None
        if self.example_weight > 0 and not use_batch:
            return self._affine(self._example_weighed(x))
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, use_batch, 0.0, self.eps
        )

    def _example_weighed(self, x: torch.Tensor) -> torch.Tensor:
        """x normalised by μ_i = α·E[x_i] + (1 − α)·μ and σ²_i = α·E[x_i²] + (1 − α)(σ² + μ²) − μ_i²,
        E over the example's own positions (H·W; one value per feature for [N, C]), μ and σ² the
        running statistics. Written as the variance of the two-part mixture, which is the same
        number without the cancellation: σ²_i = α·Var[x_i] + (1 − α)·σ² + α(1 − α)(E[x_i] − μ)²."""
        assert self.running_mean is not None
        assert self.running_var is not None
        alpha = self.example_weight
        own = list(range(2, x.dim()))
        own_mean = x.mean(own, keepdim=True) if own else x
        own_var = x.var(own, unbiased=False, keepdim=True) if own else torch.zeros_like(x)
        mu, var = _per_channel(self.running_mean, x), _per_channel(self.running_var, x)
        mean = alpha * own_mean + (1 - alpha) * mu
        mixed_var = alpha * own_var + (1 - alpha) * var + alpha * (1 - alpha) * (own_mean - mu) ** 2
        return (x - mean) / torch.sqrt(mixed_var + self.eps)


class WeighedBatchNorm(_BatchNormAnyDim):
    """Batch normalisation: PyTorch's in training, `_eval` (example weighing when α > 0) at eval."""

    def __init__(self, num_features: int, cfg: NormConfig) -> None:
        affine = cfg.learns_gamma or cfg.learns_beta
        super().__init__(num_features, cfg.eps, cfg.momentum, affine, cfg.track_running_stats)
        self.example_weight = cfg.example_weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return super().forward(x)
        self._check_input_dim(x)
        return self._eval(x)


class NoisyBatchNorm(WeighedBatchNorm):
    """'Noisy' BN (Santurkar et al. 2018 §3.1): BN, then in every training step noise added to each
    activation, N(m_c, s_c²) i.i.d. over samples and positions, with m_c ~ U(−noise_mean, noise_mean)
    and s_c ~ U(0, noise_std) drawn anew per channel at every step: a distribution that shifts all the
    time. Eval mode is plain BN (with example weighing if asked), noise-free, so it folds like BN.

    Noise is drawn only in a training step (train mode with autograd recording): recalibration and
    the batch-statistics answer (train mode under no_grad) see plain BN. The draws come from a stream
    keyed on (the run's seed, the layer, the step), all three in buffers: the global RNG is untouched
    (weights and dropout masks stay those of a `batch` run of the same seed) and a resumed run draws
    the noise it would have drawn.
    """

    noise_key: torch.Tensor
    noise_step: torch.Tensor

    def __init__(self, num_features: int, cfg: NormConfig) -> None:
        super().__init__(num_features, cfg)
        self.noise_mean, self.noise_std = cfg.noise_mean, cfg.noise_std
        # The seed make_net runs under (training.build_model seeds it with the run's); `seed_noise`
        # numbers the layers.
        self.register_buffer("noise_key", torch.tensor([torch.initial_seed() & _SEED_BITS, 0]))
        self.register_buffer("noise_step", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        if not (self.training and torch.is_grad_enabled()):
            return y
        mean, scale, z = self.draw(y)
        with torch.no_grad():
            self.noise_step.add_(1)
        return y + _per_channel(mean, y) + _per_channel(scale, y) * z

    def draw(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This step's per-channel mean and scale and the standard normal z shaped like `y`."""
        seed, layer = (int(v) for v in self.noise_key.tolist())
        state = np.random.SeedSequence([seed, layer, int(self.noise_step)]).generate_state(1, np.uint64)
        generator = torch.Generator(device=y.device).manual_seed(int(state[0]) & _SEED_BITS)
        c, options = y.shape[1], {"generator": generator, "device": y.device, "dtype": y.dtype}
        mean = (torch.rand(c, **options) * 2 - 1) * self.noise_mean  # type: ignore[call-overload]
        scale = torch.rand(c, **options) * self.noise_std  # type: ignore[call-overload]
        z = torch.randn(y.shape, **options)  # type: ignore[call-overload]
        return mean, scale, z


def seed_noise(model: nn.Module) -> None:
    """Give each NoisyBatchNorm of `model` its own noise stream: layer k (in order) gets key k."""
    noisy = [m for m in model.modules() if isinstance(m, NoisyBatchNorm)]
    for index, module in enumerate(noisy):
        with torch.no_grad():
            module.noise_key[1] = index


class BatchRenorm(_BatchNormAnyDim):
    """Batch renormalisation (Ioffe 2017); running statistics update exactly as BatchNorm's."""

    def __init__(self, num_features: int, cfg: NormConfig) -> None:
        super().__init__(num_features, cfg.eps, cfg.momentum, cfg.learns_gamma or cfg.learns_beta, True)
        self.rmax, self.dmax = cfg.rmax, cfg.dmax
        self.example_weight = cfg.example_weight
        self.warmup_steps = cfg.renorm_warmup_steps
        self.rmax_steps, self.dmax_steps = cfg.renorm_rmax_steps, cfg.renorm_dmax_steps

    def limits(self, step: int) -> tuple[float, float]:
        """(rmax, dmax) in force at 0-based training step `step`: 1 and 0 during the warm-up, then
        linear ramps to the configured limits."""
        return (
            1.0 + (self.rmax - 1.0) * _ramp(step, self.warmup_steps, self.rmax_steps),
            self.dmax * _ramp(step, self.warmup_steps, self.dmax_steps),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not self.training:
            return self._eval(x)
        n = _check_values_per_channel(x)
        assert self.running_mean is not None
        assert self.running_var is not None
        assert self.num_batches_tracked is not None
        rmax, dmax = self.limits(int(self.num_batches_tracked))
        dims = _channel_dims(x)
        mean = x.mean(dims)
        var = x.var(dims, unbiased=False)
        sigma_b = torch.sqrt(var + self.eps)
        sigma = torch.sqrt(self.running_var + self.eps)
        # r and d are constants for backprop (the paper's stop_gradient).
        r = (sigma_b.detach() / sigma).clamp(1.0 / rmax, rmax)
        d = ((mean.detach() - self.running_mean) / sigma).clamp(-dmax, dmax)
        x_hat = (x - _per_channel(mean, x)) / _per_channel(sigma_b, x) * _per_channel(r, x)
        y = self._affine(x_hat + _per_channel(d, x))
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            f = self.momentum if self.momentum is not None else 1.0 / int(self.num_batches_tracked)
            self.running_mean.mul_(1 - f).add_(mean.detach(), alpha=f)
            self.running_var.mul_(1 - f).add_(var.detach() * n / (n - 1), alpha=f)
        return y


def _ramp(step: int, start: int, end: int) -> float:
    """0 until `start`, 1 from `end` on, linear in between (a ramp with start == end is a step)."""
    if step >= end:
        return 1.0
    if step <= start:
        return 0.0
    return (step - start) / (end - start)


class GhostBatchNorm(_BatchNormAnyDim):
    """BN per virtual batch of `virtual_batch_size` samples; γ, β and running statistics are shared
    and updated once per virtual batch, in order (as BN applied to each chunk in turn).

    A batch of n samples is cut into ⌈n / size⌉ chunks of near-equal size (`tensor_split`): exactly
    `size` each when size divides n; a final partial batch gives smaller chunks, never one of a
    single sample (fewer chunks then), which BN could not normalise.
    """

    def __init__(self, num_features: int, cfg: NormConfig) -> None:
        affine = cfg.learns_gamma or cfg.learns_beta
        super().__init__(num_features, cfg.eps, cfg.momentum, affine, cfg.track_running_stats)
        self.virtual_batch_size = cfg.virtual_batch_size
        self.example_weight = cfg.example_weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not self.training:
            return self._eval(x)
        chunks = ghost_chunks(x.shape[0], self.virtual_batch_size)
        return torch.cat([self._chunk(part) for part in x.tensor_split(chunks)])

    def _chunk(self, x: torch.Tensor) -> torch.Tensor:
        f = 0.0
        if self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            f = self.momentum if self.momentum is not None else 1.0 / int(self.num_batches_tracked)
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, True, f, self.eps)


def ghost_chunks(n: int, size: int) -> int:
    """How many virtual batches a batch of n samples is cut into (see GhostBatchNorm)."""
    return max(1, min(math.ceil(n / size), n // 2))


class BatchLayerNorm(nn.Module):
    """Batch Layer Normalization: y = γ·[x_f·(1/B − 1e-4) + x_b·(1 − 1/B − 1e-4)]/√d + β.

    x_b is batch-normalised per channel (batch statistics in training; the population statistics in
    eval), x_f layer-normalised per sample over (C[, H, W]), both with biased variances and `eps`;
    B is the training batch size (fixed, as in the authors' layer) and d the number of channels (the
    authors' feature size, their last axis). Training accumulates each batch's mean and unbiased
    (Bessel-corrected) variance; `end_epoch()` makes their averages over the epoch the population
    statistics. With `track_running_stats=False`, eval uses the batch's statistics instead.
    """

    running_mean: torch.Tensor
    running_var: torch.Tensor
    epoch_mean_sum: torch.Tensor
    epoch_var_sum: torch.Tensor
    epoch_batches: torch.Tensor

    def __init__(self, num_features: int, cfg: NormConfig) -> None:
        super().__init__()
        if cfg.bln_batch_size is None or cfg.bln_batch_size < 2:
            raise ValueError("batch_layer needs the training batch size (bln_batch_size >= 2)")
        self.num_features, self.eps = num_features, cfg.eps
        self.batch_size = cfg.bln_batch_size
        self.track_running_stats = cfg.track_running_stats
        affine = cfg.learns_gamma or cfg.learns_beta
        self.weight = nn.Parameter(torch.ones(num_features)) if affine else None
        self.bias = nn.Parameter(torch.zeros(num_features)) if affine else None
        if self.track_running_stats:
            for name, value in (("running_mean", 0.0), ("running_var", 1.0)):
                self.register_buffer(name, torch.full((num_features,), value))
            self.register_buffer("epoch_mean_sum", torch.zeros(num_features))
            self.register_buffer("epoch_var_sum", torch.zeros(num_features))
            self.register_buffer("epoch_batches", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = _channel_dims(x)
        if self.training or not self.track_running_stats:
            n = _check_values_per_channel(x) if self.training else 0
            mean, var = x.mean(dims), x.var(dims, unbiased=False)
            if self.training and self.track_running_stats:
                with torch.no_grad():
                    self.epoch_mean_sum.add_(mean.detach())
                    self.epoch_var_sum.add_(var.detach() * n / (n - 1))
                    self.epoch_batches.add_(1)
        else:
            mean, var = self.running_mean, self.running_var
        x_b = (x - _per_channel(mean, x)) / _per_channel(torch.sqrt(var + self.eps), x)
        features = list(range(1, x.dim()))
        f_mean, f_var = x.mean(features, keepdim=True), x.var(features, unbiased=False, keepdim=True)
        x_f = (x - f_mean) / torch.sqrt(f_var + self.eps)
        inv_b = 1.0 / self.batch_size
        mixed = (x_f * (inv_b - BLN_OFFSET) + x_b * (1.0 - inv_b - BLN_OFFSET)) / math.sqrt(self.num_features)
        if self.weight is not None:
            mixed = mixed * _per_channel(self.weight, x)
        if self.bias is not None:
            mixed = mixed + _per_channel(self.bias, x)
        return mixed

    def end_epoch(self) -> None:
        """The epoch's average batch statistics become the population statistics; start a new epoch."""
        if not self.track_running_stats or int(self.epoch_batches) == 0:
            return
        with torch.no_grad():
            count = int(self.epoch_batches)
            self.running_mean.copy_(self.epoch_mean_sum / count)
            self.running_var.copy_(self.epoch_var_sum / count)
            self.epoch_mean_sum.zero_()
            self.epoch_var_sum.zero_()
            self.epoch_batches.zero_()


def end_epoch(model: nn.Module) -> None:
    """Tell every layer with per-epoch statistics (BatchLayerNorm) that an epoch of training ended."""
    for module in model.modules():
        # BatchLayerNorm, and an rnn's per-step batch-layer norm (recurrent.RecurrentBatchLayerNorm).
        finish = getattr(module, "end_epoch", None)
        if callable(finish):
            finish()


def uses_batch_statistics(module: nn.Module) -> bool:
    """Whether `module` normalises with statistics over the batch in train mode."""
    # An rnn's per-step norms (service/ml/recurrent.py) say so with a class attribute.
    return (
        isinstance(module, _BatchNorm | BatchLayerNorm) or getattr(module, "batch_statistics", False) is True
    )


class FilterResponseNorm(nn.Module):
    """Filter Response Normalization with its thresholded linear unit (Singh & Krishnan 2020):
    ν² = mean of x² over each sample's channel (its H·W positions), x̂ = x / √(ν² + |ε|),
    y = γ·x̂ + β, z = max(y, τ). No batch statistics, so train and eval are the same function.

    On [N, C] features each feature is a 1×1 map (the paper's treatment of fully connected layers):
    ν² = x², and the learned ε is what keeps x̂ from being sign(x). ε is one learned scalar per layer
    (the paper's code takes a scalar), initialised to the spec's `eps`; the TLU's τ is per channel.
    """

    def __init__(self, num_features: int, cfg: NormConfig) -> None:
        super().__init__()
        self.num_features = num_features
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.tau = nn.Parameter(torch.zeros(num_features))
        self.eps = nn.Parameter(torch.tensor(float(cfg.eps)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nu2 = x.pow(2).mean(list(range(2, x.dim())), keepdim=True) if x.dim() > 2 else x.pow(2)
        y = x * torch.rsqrt(nu2 + self.eps.abs())
        if self.weight is not None:
            y = y * _per_channel(self.weight, y)
        if self.bias is not None:
            y = y + _per_channel(self.bias, y)
        return torch.maximum(y, _per_channel(self.tau, y))


class ScaledWeightStandardization(nn.Module):
    """Scaled weight standardization (Brock et al. 2021a), a parametrisation of a Linear/Conv weight:
    Ŵ_i = g_i·γ·(W_i − μ_i) / √max(N·σ²_i, 1e-4) per output unit i, μ_i and σ²_i (biased) over its
    N = fan-in weights, g_i a learned gain (1 at init), γ the NF-ResNet gain of the activation that
    feeds the layer (1 for a layer fed by the data)."""

    def __init__(self, out_units: int, gamma: float, learn_gain: bool) -> None:
        super().__init__()
        self.gamma = gamma
        self.gain = nn.Parameter(torch.ones(out_units)) if learn_gain else None

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        flat = weight.flatten(1)
        mean = flat.mean(1, keepdim=True)
        var = flat.var(1, unbiased=False, keepdim=True)
        scale = torch.rsqrt(torch.clamp(var * flat.shape[1], min=WS_EPS)) * self.gamma
        if self.gain is not None:
            scale = scale * self.gain.unsqueeze(1)
        return ((flat - mean) * scale).reshape(weight.shape)


def standardize_weights(layers: list[nn.Linear | nn.Conv2d], activation: str, learn_gain: bool) -> None:
    """Scaled WS on each of `layers`, given input to output: the first sees the data (γ = 1), each
    later one the output of `activation` (its NF-ResNet γ)."""
    for index, layer in enumerate(layers):
        gamma = 1.0 if index == 0 else NF_GAMMA[activation]
        standardization = ScaledWeightStandardization(layer.weight.shape[0], gamma, learn_gain)
        parametrize.register_parametrization(layer, "weight", standardization)
