"""Networks built from a ModelConfig: the article's MLP and a small CNN, with any normaliser.

The article's Keras model is Flatten -> Dense(128, relu) -> BatchNormalization -> Dense(10) (logits;
the softmax lives in the loss). `make_net` generalises it, every switch a config field:

- `mlp`: Flatten → [Linear → act → norm] per hidden width (or Linear → norm → act) → Linear.
- `cnn`: the input as (C, H, W) → [Conv 3×3 (pad 1) → norm → act (or act → norm), then 2×2
  max-pooling while the map is at least 2×2] per entry of `channels` → global average pool →
  Linear. It needs an image-like input (C, H, W): 1×28×28 and 3×32×32 alike.
- `resnet` and `resmlp`: residual networks (service/ml/resnets.py): He et al.'s CIFAR ResNet of depth
  6n + 2 and a residual MLP, post- or pre-activation blocks, with Fixup or SkipInit as init options.
- `rnn`: stacked LSTM or GRU layers over the sample read as a sequence, with the norm inside the cell,
  and a Linear on the last step's hidden state (service/ml/recurrent.py; slots `cellK.bn1` …).

Dropout (p > 0) sits right before or right after each block's norm slot. Every block has a norm slot
named `bn{i}` whatever the kind (an Identity for `none` and `weight`), so probes compare runs with
and without normalisation layer by layer (`norm_slots`), and state_dict keys never shift. A residual
network's slots sit in its blocks (`block3.branch.bn1`), with `bn0` in the stem and `bn_out` after the
last pre-activation block.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import re
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm
from torch.overrides import TorchFunctionMode

from service.ml import recurrent, resnets
from service.ml.config import RESIDUAL_ARCHS, ModelConfig
from service.ml.norms import make_norm, seed_noise, standardize_weights

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
}
_SLOT = re.compile(r"bn(\d+|_out)")
Block = list[tuple[str, nn.Module]]


def make_net(cfg: ModelConfig) -> nn.Sequential:
    """Build the network described by `cfg`, freshly initialised from torch's global RNG.

    Modules are named (flatten, fc1, act1, bn1, ..., out) so that state_dict keys such as
    `fc1.weight` or `bn1.running_mean` do not shift when a layer is added or removed elsewhere:
    checkpoints stay readable across configurations.
    """
    _check(cfg)
    net = nn.Sequential(OrderedDict(_layers(cfg)))
    _initialise(net, cfg)
    resnets.initialise(net, cfg)  # Fixup re-draws its branches and zeroes the classifier
    # Every Linear/Conv but the output layer, input to output (inside residual blocks too).
    hidden = [m for name, m in net.named_modules() if name != "out" and isinstance(m, nn.Linear | nn.Conv2d)]
    if cfg.norm.kind == "weight":
        # After init, so g = ‖v‖ starts the network at the weights just drawn (Salimans & Kingma).
        for module in hidden:
            weight_norm(module, name="weight", dim=0)
    if cfg.norm.kind == "ws":  # after init too: WS standardises whatever weights were drawn
        standardize_weights(hidden, cfg.activation, cfg.norm.learns_gamma)
    seed_noise(net)  # noisy_batch: each layer its own noise stream
    return net


def _layers(cfg: ModelConfig) -> Block:
    if cfg.arch == "resnet":
        return resnets.resnet(cfg, _ACTIVATIONS[cfg.activation])
    if cfg.arch == "resmlp":
        return resnets.resmlp(cfg, _ACTIVATIONS[cfg.activation])
    if cfg.arch == "rnn":
        return recurrent.rnn(cfg)
    return _mlp(cfg) if cfg.arch == "mlp" else _cnn(cfg)


def _check(cfg: ModelConfig) -> None:
    if cfg.arch not in ("mlp", "cnn", "rnn", *sorted(RESIDUAL_ARCHS)):
        raise ValueError(f"unknown arch {cfg.arch!r}; expected 'mlp', 'cnn', 'resnet', 'resmlp' or 'rnn'")
    if cfg.residual_init not in ("default", "fixup", "skipinit"):
        raise ValueError(f"unknown residual init {cfg.residual_init!r}")
    if cfg.arch not in RESIDUAL_ARCHS and cfg.residual_init != "default":
        raise ValueError(f"init {cfg.residual_init!r} needs residual blocks: arch 'resnet' or 'resmlp'")
    if cfg.activation not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {cfg.activation!r}; expected one of {sorted(_ACTIVATIONS)}")
    if cfg.norm.position not in ("after_activation", "before_activation"):
        raise ValueError(f"unknown norm position {cfg.norm.position!r}")
    if cfg.dropout_position not in ("before_norm", "after_norm"):
        raise ValueError(f"unknown dropout position {cfg.dropout_position!r}")
    if not 0 <= cfg.dropout < 1 or not cfg.init_scale > 0 or cfg.init not in ("pytorch", "glorot"):
        raise ValueError("dropout must be in [0, 1), init_scale > 0, init 'pytorch' or 'glorot'")
    if cfg.arch == "rnn":
        recurrent.check(cfg)
        if cfg.num_classes < 2:
            raise ValueError("num_classes must be >= 2")
        return
    if cfg.arch in RESIDUAL_ARCHS:
        resnets.check(cfg)
    elif cfg.norm.kind == "frn" and (cfg.activation != "relu" or cfg.norm.position != "before_activation"):
        raise ValueError(
            "norm kind frn ends in its own activation, the TLU max(y, τ) that replaces ReLU: it needs "
            "activation 'relu' and position 'before_activation' (Linear/Conv → FRN → TLU)"
        )
    widths = cfg.hidden if cfg.arch == "mlp" else cfg.channels
    if cfg.num_classes < 2 or not widths or any(width < 1 for width in widths):
        raise ValueError("num_classes must be >= 2 and every width >= 1")
    if cfg.arch == "cnn" and len(cfg.input_shape) != 3:
        raise ValueError(
            f"arch 'cnn' needs an image input (channels, height, width); this data's samples are"
            f" {tuple(cfg.input_shape)}"
        )


def _mlp(cfg: ModelConfig) -> Block:
    layers: Block = [("flatten", nn.Flatten())]
    in_features = math.prod(cfg.input_shape)
    for i, width in enumerate(cfg.hidden, start=1):
        layers += _block(cfg, i, (f"fc{i}", nn.Linear(in_features, width)), width, positions=None)
        in_features = width
    return [*layers, ("out", nn.Linear(in_features, cfg.num_classes))]


def _cnn(cfg: ModelConfig) -> Block:
    c, h, w = cfg.input_shape
    # Flatten then unflatten: any layout with C·H·W values per sample works, as for the mlp.
    layers: Block = [("flatten", nn.Flatten()), ("image", nn.Unflatten(1, (c, h, w)))]
    for i, width in enumerate(cfg.channels, start=1):
        conv = nn.Conv2d(c, width, kernel_size=3, padding=1)
        layers += _block(cfg, i, (f"conv{i}", conv), width, positions=h * w)
        if h >= 2 and w >= 2:  # pooling stops at 1×1 maps (many blocks on a small input)
            layers.append((f"pool{i}", nn.MaxPool2d(2)))
            h, w = h // 2, w // 2
        c = width
    head = nn.Linear(c, cfg.num_classes)
    return [*layers, ("gap", nn.AdaptiveAvgPool2d(1)), ("gap_flat", nn.Flatten()), ("out", head)]


def _block(
    cfg: ModelConfig, i: int, layer: tuple[str, nn.Module], width: int, *, positions: int | None
) -> Block:
    """Linear/Conv, then the activation and the norm slot in the configured order, with dropout
    before or after the slot: BN after the activation (the Keras code) or before it (the paper).
    `positions`: H·W of a conv block's feature map; None for a Linear block."""
    spatial = positions is not None
    norm = make_norm(cfg.norm, width, spatial=spatial, positions=positions or 1)
    slot: Block = [(f"bn{i}", norm)]
    if cfg.dropout > 0:
        drop = (f"drop{i}", nn.Dropout(cfg.dropout))
        slot = [drop, *slot] if cfg.dropout_position == "before_norm" else [*slot, drop]
    # FRN's TLU max(y, τ) is the block's activation: the act slot stays, as an identity.
    act_module = nn.Identity() if cfg.norm.kind == "frn" else _ACTIVATIONS[cfg.activation]()
    act = (f"act{i}", act_module)
    if cfg.norm.position == "before_activation":
        return [layer, *slot, act]
    return [layer, act, *slot]


def _initialise(net: nn.Module, cfg: ModelConfig) -> None:
    """PyTorch's init as built, or Keras' (Glorot-uniform kernels, zero biases); then `init_scale`."""
    if cfg.init == "pytorch" and cfg.init_scale == 1.0:
        return  # draw nothing more: the RNG stream (and every seed's weights) stay as they were
    with torch.no_grad():
        for module in _weighted(net):
            if cfg.init == "glorot":
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            module.weight.mul_(cfg.init_scale)


def _weighted(net: nn.Module) -> Iterator[nn.Linear | nn.Conv2d]:
    for module in net.modules():
        if isinstance(module, nn.Linear | nn.Conv2d):
            yield module


def norm_slots(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The normalisation slot of each block (`bn1`, `bn2`, …; `block1.branch.bn1`, … in a residual
    network) in order, Identity ones included."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if _SLOT.fullmatch(name.rpartition(".")[2]) and ".parametrizations." not in name
    ]


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (BN's running buffers are not parameters, as in Keras' 'trainable')."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# Cached (a config is frozen, so hashable): a submit counts one spec's parameters up to three times
# (body validation, the dataset check, its answer) and its flops once, each a few milliseconds of
# meta-device work; grids and repeated submits reuse configs. The cache holds only ints.
@functools.lru_cache(maxsize=1024)
def parameter_count(cfg: ModelConfig) -> int:
    """Trainable parameters of `make_net(cfg)`, counted on the meta device: no memory, no RNG draw."""
    with torch.device("meta"):
        return count_parameters(make_net(cfg))


@dataclass(frozen=True)
class ForwardProfile:
    """What one sample's forward pass computes: the floating-point operations of Linear layers (2 per
    multiply-add), of convolutions, and of everything else (ELEMENTWISE_FLOPS per value output by
    norms, activations, pooling, residual additions), and the calls of layers (what a step's Python
    and dispatch overhead grows with; a layer called at every time step counts at each), and the
    convolutions (each sets up oneDNN's kernels forward and backward, whatever its size), and the
    values of the largest output of any layer (what a batch's activations take from the caches)."""

    linear_flops: int
    conv_flops: int
    other_flops: int
    calls: int
    conv_layers: int = 0
    largest_output: int = 0

    @property
    def flops(self) -> int:
        return self.linear_flops + self.conv_flops + self.other_flops


# The counting passes run on the CPU, several times faster than on the meta device (where norms and
# activations run as Python decompositions: the cards' 51 networks took 2.6 s there, 0.7 s on the
# CPU). But they compute there: a wide CNN on 128×128 inputs took over a second and most of a
# gigabyte. Networks whose three samples may cost more than this many flops (bounded from above by
# 2 per multiply-add × parameters × positions per input channel) are counted on the meta device.
CPU_COUNTING_MAX_FLOPS = 10**10


# The counting pass's batch: a BN without running statistics normalises with the batch's own
# statistics in eval mode too, which one sample cannot give.
COUNTED_SAMPLES = 2


@functools.lru_cache(maxsize=1024)
def forward_profile(cfg: ModelConfig) -> ForwardProfile:
    """Measured by forward passes of the network itself, so that every architecture is counted the
    same way: on zeroed weights on the CPU (_zeroed_net), or on the meta device for a large network."""
    return _measured_profile(cfg, on_cpu=counts_on_cpu(cfg))


def _measured_profile(cfg: ModelConfig, *, on_cpu: bool) -> ForwardProfile:
    counts = {"linear": 0, "conv": 0, "other": 0, "conv_layers": 0, "largest": 0}

    def count(module: nn.Module, _args: object, output: torch.Tensor) -> None:
        counts["largest"] = max(counts["largest"], output.numel())
        if isinstance(module, nn.Linear):
            rows = output.numel() // module.out_features  # 1, or one per position it is applied at
            counts["linear"] += 2 * module.in_features * module.out_features * rows
        elif isinstance(module, nn.Conv2d):
            k = math.prod(module.kernel_size) * module.in_channels // module.groups
            counts["conv"] += 2 * k * output.numel()
            counts["conv_layers"] += 1
        elif not isinstance(module, nn.Sequential):
            counts["other"] += ELEMENTWISE_FLOPS * output.numel()

    def count_block(module: nn.Module, _args: object, output: torch.Tensor) -> None:
        counts["other"] += ELEMENTWISE_FLOPS * output.numel()  # the addition, α or Fixup's scalars

    def count_cell(module: nn.Module, _args: object, output: torch.Tensor) -> None:
        # An rnn layer's gates and states at every step (output: [1, T, H]).
        assert isinstance(module, recurrent.RecurrentLayer)
        counts["other"] += ELEMENTWISE_FLOPS * recurrent.STEP_VALUES[module.cell] * output.numel()
        counts["largest"] = max(counts["largest"], output.numel())

    with contextlib.nullcontext() if on_cpu else torch.device("meta"):
        net = (_zeroed_net(cfg) if on_cpu else make_net(cfg)).eval()
        handles = [m.register_forward_hook(count) for m in _counted(net)]
        handles += [m.register_forward_hook(count_block) for m in resnets.blocks(net)]
        handles += [m.register_forward_hook(count_cell) for m in recurrent.layers(net)]
        with torch.no_grad():
            net(torch.zeros(COUNTED_SAMPLES, *cfg.input_shape))
        for handle in handles:
            handle.remove()
        calls = _dispatches(net, cfg)
    n = COUNTED_SAMPLES  # the values' counts per sample; conv_layers counts calls, the same for any batch
    return ForwardProfile(
        counts["linear"] // n, counts["conv"] // n, counts["other"] // n, calls, counts["conv_layers"],
        counts["largest"] // n,
    )  # fmt: skip


def counts_on_cpu(cfg: ModelConfig) -> bool:
    """Whether forward_profile runs its passes on the CPU (see CPU_COUNTING_MAX_FLOPS): a layer is
    applied at most once per position of an input channel (a Linear once, a convolution at each
    pixel of a map no larger than the input's, a cell at each step)."""
    channels = cfg.input_shape[0] if len(cfg.input_shape) > 1 else 1
    positions = math.prod(cfg.input_shape) // channels
    return 2 * 3 * parameter_count(cfg) * positions <= CPU_COUNTING_MAX_FLOPS


def _zeroed_net(cfg: ModelConfig) -> nn.Sequential:
    """The network on the CPU with every parameter and buffer zero: built on the meta device, so
    that no initialiser draws from the RNG, then given memory."""
    with torch.device("meta"):
        net = make_net(cfg)
    net = net.to_empty(device="cpu")
    with torch.no_grad():
        for tensor in itertools.chain(net.parameters(), net.buffers()):
            tensor.zero_()
    return net


class _Dispatches(TorchFunctionMode):
    """Counts the torch functions and tensor methods called: each is a trip through PyTorch's
    Python layer and dispatcher, the fixed cost that dominates small, deep and recurrent networks."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(
        self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        self.count += 1
        return func(*args, **(kwargs or {}))


def _dispatches(net: nn.Module, cfg: ModelConfig) -> int:
    """Torch calls of one training-mode forward pass (a batch of COUNTED_SAMPLES), with gradients
    on and without hooks, so that every layer takes the path training takes (an rnn's fused kernel,
    its all-steps BN, noisy BN's noise); the RNG forked, so that a run's random stream stays its own.
    Eval mode where training mode cannot run (on the meta device, batch renorm reads a number): the
    estimates that use the count must not fail where the run itself would."""
    sample = torch.zeros(COUNTED_SAMPLES, *cfg.input_shape)
    for train in (True, False):
        counter = _Dispatches()
        try:
            with torch.random.fork_rng(devices=[]), counter:
                net.train(train)(sample)
        except RuntimeError:
            continue
        return counter.count
    raise AssertionError("a forward pass in eval mode runs on the meta device")


def forward_flops(cfg: ModelConfig) -> int:
    """Floating-point operations of one sample's forward pass (ForwardProfile)."""
    return forward_profile(cfg).flops


def _counted(module: nn.Module) -> Iterator[nn.Module]:
    """The layers whose outputs forward_flops counts: every Linear/Conv (a weight-normalised one with
    its parametrization) and every other module without children, inside blocks too."""
    for child in module.children():
        if isinstance(child, nn.Linear | nn.Conv2d) or not any(True for _ in child.children()):
            yield child
        else:
            yield from _counted(child)


def warm_up_meta_device() -> None:
    """The first network built on the meta device and counted in a process costs about a second:
    torch loads its meta kernels lazily, and imports torch._dynamo for some of them (var_mean, which
    weight standardisation computes as its layers are built: 0.6 s). The processes that count flops
    and parameters per submitted run call this at start-up, so that no request or run waits for it.

    It runs no kernel on the CPU: the API's parent process calls it before it forks the API
    processes, and a CPU kernel with more than one thread there starts OpenMP's threads, which a
    forked child cannot use: the first such kernel in a child's main thread (an inference on a batch
    of two) then waits for them forever."""
    import torch._dynamo  # noqa: F401

    _measured_profile(ModelConfig(), on_cpu=False)


# Norms cost a handful of operations per value (subtract, scale, shift, statistics); so do the rest.
ELEMENTWISE_FLOPS = 5
