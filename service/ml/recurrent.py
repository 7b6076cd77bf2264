"""Recurrent networks for `nets.make_net` (arch `rnn`): stacked LSTM or GRU layers over a sequence,
with a normalisation inside the cell, and a Linear classifier on the last step's hidden state
(docs/deep-lab.md, Recurrent networks; the formulas in docs/normalizers.md).

A sample is read as a sequence (`sequence_shape`): an image (C, H, W) row by row, H steps of C·W
values (1×28×28: 28 steps of 28; 3×32×32: 32 steps of 96); a vector (L,) as L steps of one value
(MNIST-1D: 40 steps of 1); a matrix (T, F) as T steps of F values.

The cell's normalisations (`model.norm.kind`), each on the input-to-hidden product W_x·x_t, the
hidden-to-hidden product W_h·h_{t−1} (separately) and, in an LSTM, the cell state c_t before its tanh:

- `none`: the plain cell; with the same weights an LSTM (GRU) layer computes what torch.nn.LSTM
  (torch.nn.GRU) does.
- `batch`: recurrent batch normalisation (Cooijmans et al. 2016): per-feature batch statistics taken
  separately at every time step, and running (population) statistics kept per step up to
  `max_steps`; later steps normalise with their own batch statistics in training and share the last
  step's running statistics (which they update too). γ starts at 0.1; the two product BNs have no β
  (the cell's single bias b replaces them), the cell-state BN has one.
- `layer`: layer normalisation (Ba et al. 2016) of each product and of the cell state, per sample.
- `batch_layer`: batch-layer normalisation (norms.BatchLayerNorm's formula) with its batch part's
  statistics per time step, as recurrent BN's, and per-epoch population averages per step.

With norm `none` and nothing observing the cell (no hooks on its products or slots, no export
tracing it) a layer runs torch's fused kernel (`torch.lstm`, `torch.gru`) with its own parameters: the
same recurrence, equal to the step loop up to float rounding (the products are summed in another
order), and several times faster. Probes, the flops count and ONNX export hook or trace the cell, and
so see the step loop, slot by slot, as before.

Each layer of the stack is a module `cellK` holding its weight products (`ih`, `hh`: Linears without
bias, so the gradient probe and the flops count find them) and its norm slots `bn1` (input product),
`bn2` (hidden product) and, in an LSTM, `bn3` (cell state), whatever the kind (`StepIdentity` for
`none`), so `nets.norm_slots` and the probes find them as they do a block's `bnK`. A slot is called
once per time step with (input, step).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as torch_module

from service.ml.config import ModelConfig, NormConfig
from service.ml.norms import BLN_OFFSET

Block = list[tuple[str, nn.Module]]
# Cooijmans et al. 2016, §4: "we initialize γ to 0.1", which keeps tanh and σ out of saturation.
RECURRENT_BN_GAMMA = 0.1
# Norm kinds an rnn's cell takes.
CELL_NORM_KINDS = ("none", "batch", "layer", "batch_layer")
# Gate blocks per step: LSTM i, f, g, o; GRU r, z, n.
GATES = {"lstm": 4, "gru": 3}
# Values a cell computes per step and hidden unit besides its products (gates, states): what the
# flops count charges ELEMENTWISE_FLOPS each.
STEP_VALUES = {"lstm": 6, "gru": 4}
# Plain cells (norm `none`) run torch's fused kernels when nothing observes them; False keeps every
# cell on the step loop (tests compare the two).
USE_FUSED_KERNELS = True
# The input product's norm (bn1) normalises all steps in one call where its statistics allow
# (`normalise_all_steps`); False calls it step by step (tests compare the two).
NORMALISE_STEPS_AT_ONCE = True
# A sequence longer than this is refused: one step is one Python iteration of the autograd loop.
MAX_SEQUENCE_STEPS = 1024


def sequence_shape(input_shape: tuple[int, ...]) -> tuple[int, int]:
    """(steps, features per step) for samples of `input_shape`; ValueError when it is no sequence."""
    if len(input_shape) == 3:
        c, h, w = input_shape
        steps, features = h, c * w  # row by row, each row's channels side by side
    elif len(input_shape) == 2:
        steps, features = input_shape
    elif len(input_shape) == 1:
        steps, features = input_shape[0], 1
    else:
        raise ValueError(
            f"arch 'rnn' reads a sample as a sequence: [T, F] (T steps of F values), an image [C, H, W] "
            f"(H rows of C·W values) or a vector [L] (L steps of 1); samples of shape {list(input_shape)} "
            "are none of these"
        )
    if steps > MAX_SEQUENCE_STEPS:
        raise ValueError(
            f"arch 'rnn' reads samples of shape {list(input_shape)} as {steps} steps of {features} "
            f"value(s); at most {MAX_SEQUENCE_STEPS} steps are accepted"
        )
    return steps, features


def check(cfg: ModelConfig) -> None:
    """ValueError with the reason when `cfg` describes no rnn this module builds."""
    sequence_shape(cfg.input_shape)
    if cfg.cell not in GATES:
        raise ValueError(f"unknown cell {cfg.cell!r}; expected 'lstm' or 'gru'")
    if cfg.hidden_size < 1 or cfg.layers < 1:
        raise ValueError("an rnn needs hidden_size >= 1 and layers >= 1")
    if cfg.norm.kind not in CELL_NORM_KINDS:
        raise ValueError(
            f"norm kind {cfg.norm.kind!r} has no recurrent form here; an rnn's cell takes "
            + ", ".join(CELL_NORM_KINDS)
        )
    if cfg.norm.max_steps is not None and cfg.norm.max_steps < 1:
        raise ValueError("norm max_steps must be >= 1")
    if cfg.dropout > 0:
        raise ValueError("dropout applies to arch 'mlp' and 'cnn', not to an rnn's cells")


def rnn(cfg: ModelConfig) -> Block:
    """The layers of an rnn: flatten, the sequence reader, `cell1` … `cellL`, the last step, `out`."""
    steps, features = sequence_shape(cfg.input_shape)
    max_steps = cfg.norm.max_steps or steps
    layer_type = LSTMLayer if cfg.cell == "lstm" else GRULayer
    layers: Block = [("flatten", nn.Flatten()), ("sequence", SequenceReader(cfg.input_shape))]
    for k in range(1, cfg.layers + 1):
        layers.append((f"cell{k}", layer_type(features, cfg.hidden_size, cfg.norm, max_steps)))
        features = cfg.hidden_size
    return [*layers, ("last", LastStep()), ("out", nn.Linear(cfg.hidden_size, cfg.num_classes))]


def layers(model: nn.Module) -> Iterator[RecurrentLayer]:
    """Every recurrent layer of `model`, input to output."""
    for module in model.modules():
        if isinstance(module, RecurrentLayer):
            yield module


class SequenceReader(nn.Unflatten):
    """[N, prod(input_shape)] → [N, T, F] (`sequence_shape`). An Unflatten, so that serving finds the
    number of values a sample has (training._input_features) as it does for a cnn."""

    def __init__(self, input_shape: tuple[int, ...]) -> None:
        super().__init__(1, tuple(input_shape))
        self.steps, self.features = sequence_shape(tuple(input_shape))

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        x = super().forward(input)
        if x.dim() == 4:  # [N, C, H, W] → [N, H, C, W]: row h's channels side by side
            x = x.permute(0, 2, 1, 3)
        return x.reshape(x.shape[0], self.steps, self.features)


class LastStep(nn.Module):
    """[N, T, H] → [N, H]: the last step's hidden state, which the classifier reads."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, -1]


# --- The norms in the cell: each called with (input [N, C], step) --------------------------------


class StepIdentity(nn.Identity):
    """The slot of kind `none`: the input as it is (a named slot all the same, for the probes)."""

    def forward(self, input: torch.Tensor, step: int = 0) -> torch.Tensor:
        return input


class StepLayerNorm(nn.LayerNorm):
    """Layer normalisation over a step's features, per sample (Ba et al. 2016): the step plays no part."""

    def forward(self, input: torch.Tensor, step: int = 0) -> torch.Tensor:
        return super().forward(input)


class RecurrentBatchNorm(nn.Module):
    """Batch normalisation with statistics per time step (Cooijmans et al. 2016).

    Training normalises step t's input [N, C] with its own batch mean and (biased) variance and moves
    running statistics slot min(t, max_steps − 1) towards them (momentum, or the cumulative average
    with momentum None; unbiased variance, as BatchNorm); eval normalises with that slot's running
    statistics. Without running statistics eval uses the batch's, as BatchNorm does.
    """

    batch_statistics = True  # norms.uses_batch_statistics: a batch of one cannot train it
    running_mean: torch.Tensor | None
    running_var: torch.Tensor | None
    num_batches_tracked: torch.Tensor | None

    def __init__(self, features: int, max_steps: int, cfg: NormConfig, *, gamma: float, beta: bool) -> None:
        super().__init__()
        self.num_features, self.max_steps = features, max_steps
        self.eps, self.momentum = cfg.eps, cfg.momentum
        self.weight = nn.Parameter(torch.full((features,), gamma)) if cfg.learns_gamma else None
        self.bias = nn.Parameter(torch.zeros(features)) if beta and cfg.learns_beta else None
        self.track_running_stats = cfg.track_running_stats
        if cfg.track_running_stats:
            self.register_buffer("running_mean", torch.zeros(max_steps, features))
            self.register_buffer("running_var", torch.ones(max_steps, features))
            self.register_buffer("num_batches_tracked", torch.zeros(max_steps, dtype=torch.long))
        else:
            self.running_mean = self.running_var = self.num_batches_tracked = None

    def slot(self, step: int) -> int:
        """The statistics slot of 0-based `step`: its own up to the limit, the last one beyond."""
        return min(step, self.max_steps - 1)

    def forward(self, x: torch.Tensor, step: int) -> torch.Tensor:
        if self.running_mean is None or self.running_var is None or self.num_batches_tracked is None:
            return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
        s = self.slot(step)
        factor = 0.0
        if self.training:
            self.num_batches_tracked[s] += 1
            # Read the count only for the cumulative average: on a GPU, int() waits for the device.
            factor = self.momentum if self.momentum is not None else 1.0 / int(self.num_batches_tracked[s])
        # Row s of a [S, C] buffer is a contiguous view: F.batch_norm updates it in place.
        return F.batch_norm(
            x,
            self.running_mean[s],
            self.running_var[s],
            self.weight,
            self.bias,
            self.training,
            factor,
            self.eps,
        )

    def all_steps(self, x: torch.Tensor) -> torch.Tensor | None:
        """Every step of `x` [N, T, C] normalised as `forward` would step by step, in one call, or None
        where that cannot be: x read as N samples of T·C features, whose batch statistics are each
        step's own, and slots 0 … T−1's running statistics, rows of [max_steps, C], one contiguous
        [T·C] view that F.batch_norm updates in place. Not beyond max_steps (later steps share the last
        slot), nor while training under the cumulative average (each slot's factor is its own count)."""
        n, steps, c = x.shape
        tracking = self.running_mean is not None and self.running_var is not None
        if steps > self.max_steps or (self.training and tracking and self.momentum is None):
            return None
        weight = self.weight.repeat(steps) if self.weight is not None else None
        bias = self.bias.repeat(steps) if self.bias is not None else None
        flat = x.reshape(n, steps * c)
        if self.running_mean is None or self.running_var is None or self.num_batches_tracked is None:
            y = F.batch_norm(flat, None, None, weight, bias, True, 0.0, self.eps)
        else:
            if self.training:
                self.num_batches_tracked[:steps] += 1
            mean, var = self.running_mean[:steps].view(-1), self.running_var[:steps].view(-1)
            y = F.batch_norm(flat, mean, var, weight, bias, self.training, self.momentum or 0.0, self.eps)
        return y.view(n, steps, c)

    def extra_repr(self) -> str:
        return f"{self.num_features}, max_steps={self.max_steps}, eps={self.eps}, momentum={self.momentum}"


class RecurrentBatchLayerNorm(nn.Module):
    """Batch-layer normalisation (norms.BatchLayerNorm) with its batch part per time step:
    y = γ·[x_f·(1/B − 1e-4) + x_b·(1 − 1/B − 1e-4)]/√d + β, x_b step t's input normalised per feature
    by step t's batch statistics (training) or slot min(t, max_steps − 1)'s population statistics
    (eval), x_f normalised per sample over its d features. The population statistics of each slot are
    the averages over an epoch of its batch means and unbiased variances (`end_epoch`)."""

    batch_statistics = True
    running_mean: torch.Tensor
    running_var: torch.Tensor
    epoch_mean_sum: torch.Tensor
    epoch_var_sum: torch.Tensor
    epoch_batches: torch.Tensor

    def __init__(self, features: int, max_steps: int, cfg: NormConfig, *, beta: bool) -> None:
        super().__init__()
        if cfg.bln_batch_size is None or cfg.bln_batch_size < 2:
            raise ValueError("batch_layer needs the training batch size (bln_batch_size >= 2)")
        self.num_features, self.max_steps, self.eps = features, max_steps, cfg.eps
        self.batch_size = cfg.bln_batch_size
        self.track_running_stats = cfg.track_running_stats
        self.weight = nn.Parameter(torch.ones(features)) if cfg.learns_gamma else None
        self.bias = nn.Parameter(torch.zeros(features)) if beta and cfg.learns_beta else None
        if self.track_running_stats:
            self.register_buffer("running_mean", torch.zeros(max_steps, features))
            self.register_buffer("running_var", torch.ones(max_steps, features))
            self.register_buffer("epoch_mean_sum", torch.zeros(max_steps, features))
            self.register_buffer("epoch_var_sum", torch.zeros(max_steps, features))
            self.register_buffer("epoch_batches", torch.zeros(max_steps, dtype=torch.long))

    def forward(self, x: torch.Tensor, step: int) -> torch.Tensor:
        s = min(step, self.max_steps - 1)
        if self.training or not self.track_running_stats:
            mean, var = x.mean(0), x.var(0, unbiased=False)
            if self.training and self.track_running_stats:
                n = x.shape[0]
                if n < 2:
                    raise ValueError(f"Expected more than 1 value per channel when training, got {x.shape}")
                with torch.no_grad():
                    self.epoch_mean_sum[s] += mean.detach()
                    self.epoch_var_sum[s] += var.detach() * n / (n - 1)
                    self.epoch_batches[s] += 1
        else:
            mean, var = self.running_mean[s], self.running_var[s]
        x_b = (x - mean) / torch.sqrt(var + self.eps)
        f_mean, f_var = x.mean(1, keepdim=True), x.var(1, unbiased=False, keepdim=True)
        x_f = (x - f_mean) / torch.sqrt(f_var + self.eps)
        inv_b = 1.0 / self.batch_size
        mixed = (x_f * (inv_b - BLN_OFFSET) + x_b * (1.0 - inv_b - BLN_OFFSET)) / math.sqrt(self.num_features)
        if self.weight is not None:
            mixed = mixed * self.weight
        if self.bias is not None:
            mixed = mixed + self.bias
        return mixed

    def end_epoch(self) -> None:
        """Each slot's epoch averages become its population statistics (slots the epoch never reached
        keep theirs); start a new epoch."""
        if not self.track_running_stats:
            return
        with torch.no_grad():
            seen = self.epoch_batches > 0
            count = self.epoch_batches.clamp_min(1).unsqueeze(1).to(self.epoch_mean_sum.dtype)
            self.running_mean[seen] = (self.epoch_mean_sum / count)[seen]
            self.running_var[seen] = (self.epoch_var_sum / count)[seen]
            self.epoch_mean_sum.zero_()
            self.epoch_var_sum.zero_()
            self.epoch_batches.zero_()


def normalise_all_steps(norm: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """`norm`'s output for every step of `x` [N, T, C] at once, as its per-step calls would give it (up
    to float rounding in γ's and β's gradients, summed over the steps in another order), or None
    where it goes step by step: a layer or batch-layer norm, a recurrent BN that cannot
    (`all_steps`), or a hooked norm (the probes record a slot's per-step input)."""
    if not NORMALISE_STEPS_AT_ONCE or norm._forward_hooks or norm._forward_pre_hooks or _global_hooks():  # noqa: SLF001
        return None
    if isinstance(norm, StepIdentity):
        return x
    # Layer norm is left step by step: at once it measured no faster.
    if isinstance(norm, RecurrentBatchNorm):
        return norm.all_steps(x)
    return None


def cell_norm(cfg: NormConfig, features: int, max_steps: int, *, product: bool) -> nn.Module:
    """One norm slot of a cell: on a weight product (`product`: no β, the cell's bias replaces it) or on
    the cell state (with β)."""
    beta = not product
    if cfg.kind == "none":
        return StepIdentity()
    if cfg.kind == "batch":
        return RecurrentBatchNorm(features, max_steps, cfg, gamma=RECURRENT_BN_GAMMA, beta=beta)
    if cfg.kind == "layer":
        learns_beta = beta and cfg.learns_beta
        norm = StepLayerNorm(
            features, cfg.eps, elementwise_affine=cfg.learns_gamma or learns_beta, bias=learns_beta
        )
        if not cfg.learns_gamma and norm.weight is not None:
            norm.register_parameter("weight", None)
        return norm
    if cfg.kind == "batch_layer":
        return RecurrentBatchLayerNorm(features, max_steps, cfg, beta=beta)
    raise ValueError(
        f"norm kind {cfg.kind!r} has no recurrent form; an rnn takes {', '.join(CELL_NORM_KINDS)}"
    )


# --- The layers -----------------------------------------------------------------------------------


class RecurrentLayer(nn.Module):
    """One layer of the stack: [N, T, F] → [N, T, H], every step's hidden state, from h_0 = c_0 = 0.
    Its input product W_x·x_t is one matmul over all steps, unbound into one view per step; the
    recurrence runs step by step. Unbound, not indexed (`wx[:, t]`): indexing's backward writes each
    step's gradient into a zeroed tensor the size of all of W_x·x (T full-size fills and additions a
    step, a third of recurrent BN's training time at 28 steps), unbind's stacks the T gradients once;
    the values are the same."""

    cell: str = ""
    # GRU: torch's two biases b_ih and b_hh (b_hn sits inside r⊙·); LSTM: one bias b.
    two_biases: bool = False
    bias_hh: nn.Parameter | None

    def __init__(self, input_size: int, hidden_size: int, norm: NormConfig, max_steps: int) -> None:
        super().__init__()
        gates = GATES[self.cell] * hidden_size
        self.input_size, self.hidden_size = input_size, hidden_size
        self.ih = nn.Linear(input_size, gates, bias=False)
        self.hh = nn.Linear(hidden_size, gates, bias=False)
        self.bn1 = cell_norm(norm, gates, max_steps, product=True)
        self.bn2 = cell_norm(norm, gates, max_steps, product=True)
        self.bias = nn.Parameter(torch.empty(gates))
        self.bias_hh = nn.Parameter(torch.empty(gates)) if self.two_biases else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """torch.nn.LSTM's and GRU's init: every weight and bias U(−1/√H, 1/√H)."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        biases = [self.bias] if self.bias_hh is None else [self.bias, self.bias_hh]
        for parameter in (self.ih.weight, self.hh.weight, *biases):
            nn.init.uniform_(parameter, -bound, bound)

    @property
    def norm_slots(self) -> list[str]:
        return ["bn1", "bn2"]

    def is_plain(self) -> bool:
        """No norm in the cell (every slot StepIdentity): the layer is torch's LSTM or GRU."""
        return all(isinstance(getattr(self, slot), StepIdentity) for slot in self.norm_slots)

    def runs_fused(self) -> bool:
        """Whether this forward may run torch's fused kernel: a plain cell (every slot StepIdentity)
        whose products and slots nobody observes. Hooks (the probes record a slot's input, the flops
        count a product's calls) and export tracing need the step loop, which calls them per step."""
        if not USE_FUSED_KERNELS or torch.compiler.is_compiling():
            return False
        observed = (self.ih, self.hh, *(getattr(self, slot) for slot in self.norm_slots))
        if not self.is_plain():
            return False
        return not (
            _global_hooks() or any(m._forward_hooks or m._forward_pre_hooks for m in observed)  # noqa: SLF001
        )

    def input_products(self, x: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], bool]:
        """W_x·x_t for every step, one view each (unbound: see the class), and whether they are already
        normalised by bn1 (`normalise_all_steps`), which then need not be called step by step."""
        wx = self.ih(x)
        normalised = normalise_all_steps(self.bn1, wx)
        return (wx if normalised is None else normalised).unbind(1), normalised is not None

    def initial_state(self, x: torch.Tensor) -> torch.Tensor:
        """h_0 (and an LSTM's c_0) for the fused kernel: zeros [layers = 1, N, H]."""
        return x.new_zeros(1, x.shape[0], self.hidden_size)


class LSTMLayer(RecurrentLayer):
    """An LSTM layer (torch.nn.LSTM's gate order i, f, g, o) with norms N (Cooijmans et al. eq. 6–8):
    (i, f, g, o) = N₂(W_h·h_{t−1}) + N₁(W_x·x_t) + b; c_t = σ(f)⊙c_{t−1} + σ(i)⊙tanh(g);
    h_t = σ(o)⊙tanh(N₃(c_t))."""

    cell = "lstm"

    def __init__(self, input_size: int, hidden_size: int, norm: NormConfig, max_steps: int) -> None:
        super().__init__(input_size, hidden_size, norm, max_steps)
        self.bn3 = cell_norm(norm, hidden_size, max_steps, product=False)

    @property
    def norm_slots(self) -> list[str]:
        return ["bn1", "bn2", "bn3"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.runs_fused():
            return self.fused(x)
        n, steps, _ = x.shape
        wx, normalised = self.input_products(x)
        h = x.new_zeros(n, self.hidden_size)
        c = x.new_zeros(n, self.hidden_size)
        outputs = []
        for t in range(steps):
            gates = (wx[t] if normalised else self.bn1(wx[t], t)) + self.bn2(self.hh(h), t) + self.bias
            i, f, g, o = gates.chunk(4, dim=1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(self.bn3(c, t))
            outputs.append(h)
        return torch.stack(outputs, dim=1)

    def fused(self, x: torch.Tensor) -> torch.Tensor:
        """The plain cell through torch.lstm: the single bias b as torch's b_ih, zeros as its b_hh
        (b_ih + b_hh is all the cell adds)."""
        params = [self.ih.weight, self.hh.weight, self.bias, torch.zeros_like(self.bias, requires_grad=False)]
        h0 = self.initial_state(x)
        output, _, _ = torch.lstm(x, (h0, h0), params, True, 1, 0.0, self.training, False, True)
        return output


class GRULayer(RecurrentLayer):
    """A GRU layer (torch.nn.GRU's equations, gate order r, z, n) with norms on the two products:
    a = N₁(W_x·x_t) + b_x, u = N₂(W_h·h_{t−1}) + b_h; r = σ(a_r + u_r), z = σ(a_z + u_z),
    n = tanh(a_n + r⊙u_n), h_t = (1 − z)⊙n + z⊙h_{t−1}. The two biases are torch's b_ih and b_hh (b_hn
    sits inside r⊙·, so they are not one bias)."""

    cell = "gru"
    two_biases = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert self.bias_hh is not None
        if self.runs_fused():
            return self.fused(x, self.bias_hh)
        n, steps, _ = x.shape
        wx, normalised = self.input_products(x)
        h = x.new_zeros(n, self.hidden_size)
        outputs = []
        for t in range(steps):
            a_r, a_z, a_n = ((wx[t] if normalised else self.bn1(wx[t], t)) + self.bias).chunk(3, dim=1)
            u_r, u_z, u_n = (self.bn2(self.hh(h), t) + self.bias_hh).chunk(3, dim=1)
            r = torch.sigmoid(a_r + u_r)
            z = torch.sigmoid(a_z + u_z)
            candidate = torch.tanh(a_n + r * u_n)
            h = (1 - z) * candidate + z * h
            outputs.append(h)
        return torch.stack(outputs, dim=1)

    def fused(self, x: torch.Tensor, bias_hh: torch.Tensor) -> torch.Tensor:
        """The plain cell through torch.gru, whose b_ih and b_hh are this layer's two biases."""
        params = [self.ih.weight, self.hh.weight, self.bias, bias_hh]
        output, _ = torch.gru(x, self.initial_state(x), params, True, 1, 0.0, self.training, False, True)
        return output


def _global_hooks() -> bool:
    """Whether hooks on every module are registered (register_module_forward_hook)."""
    return bool(torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks)  # noqa: SLF001


def has_norms(model: nn.Module) -> bool:
    """Whether an rnn's cells normalise (any slot but StepIdentity)."""
    return any(
        not isinstance(getattr(layer, slot), StepIdentity)
        for layer in layers(model)
        for slot in layer.norm_slots
    )
