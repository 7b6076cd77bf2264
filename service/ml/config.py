"""Typed configuration of a model and of a training run, as the ML core sees it.

The service validates the user's JSON spec (service/schemas.py) and converts it to these frozen
dataclasses. `ModelConfig.to_dict()` is what a checkpoint stores next to its weights, so that
`ModelConfig.from_dict()` + `make_net()` rebuild exactly the network that was trained. Every field
added since the first checkpoints has a default that builds the network those checkpoints hold, so
old stored configs load unchanged.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal, get_args

NormKind = Literal[
    "none",
    "batch",
    "layer",
    "group",
    "instance",
    "batch_renorm",
    "ghost",
    "weight",
    "batch_layer",
    "frn",
    "ws",
    "noisy_batch",
]
NORM_KINDS: tuple[NormKind, ...] = get_args(NormKind)
# Kinds that normalise with statistics over the batch in training: a batch of one cannot train.
BATCH_STAT_KINDS: frozenset[str] = frozenset({"batch", "batch_renorm", "ghost", "batch_layer", "noisy_batch"})
# Kinds that are BatchNorm with running statistics at inference: example weighing applies to them.
EVAL_BN_KINDS: frozenset[str] = frozenset({"batch", "batch_renorm", "ghost", "noisy_batch"})
NormPosition = Literal["after_activation", "before_activation"]
Activation = Literal["relu", "sigmoid", "tanh", "gelu"]
Arch = Literal["mlp", "cnn", "resnet", "resmlp", "rnn"]
RESIDUAL_ARCHS: frozenset[str] = frozenset({"resnet", "resmlp"})
# Residual blocks (docs/deep-lab.md): post_activation is He et al. 2016's v1 (conv-norm-act-conv-norm,
# add, act), pre_activation their v2 (norm-act-conv-norm-act-conv, add).
BlockKind = Literal["post_activation", "pre_activation"]
# A resnet's shortcut where a stage halves the map and doubles the channels: zero_pad is He et al.'s
# option A (subsample, zero channels appended; no parameters), projection a 1×1 conv + norm (option B).
Shortcut = Literal["zero_pad", "projection"]
# default: the layers' own init. fixup (Zhang et al. 2019) and skipinit (De & Smith 2020) start each
# residual branch at zero so that a deep network without normalisation trains.
ResidualInit = Literal["default", "fixup", "skipinit"]
DropoutPosition = Literal["before_norm", "after_norm"]
# pytorch: Linear/Conv keep PyTorch's Kaiming-uniform(a=√5) init; glorot: Keras' Glorot-uniform kernels
# with zero biases (bn-semantics.md §2).
Init = Literal["pytorch", "glorot"]
OptimizerName = Literal["adam", "sgd"]
# pixels: uint8 images, trained as x / 255; features: float inputs used as they are.
InputKind = Literal["pixels", "features"]
ScheduleKind = Literal["none", "step", "cosine"]
# The epoch-end probes a run can switch on (service/ml/probes.py, docs/probes.md); on by default: the
# ones whose cost per epoch is a few passes of the 256-sample probe batch (docs/probes.md's table).
ProbeName = Literal["gradients", "smoothness", "percentiles", "gamma", "statistics_gap"]
PROBE_NAMES: tuple[ProbeName, ...] = ("gradients", "smoothness", "percentiles", "gamma", "statistics_gap")
DEFAULT_PROBES: tuple[ProbeName, ...] = ("gradients", "percentiles", "gamma")
Trainable = Literal["all", "norm_only", "random_subset"]
BatchOrder = Literal["shuffled", "class_sorted", "k_classes"]
# rnn (service/ml/recurrent.py): the recurrent cell of each layer.
Cell = Literal["lstm", "gru"]


@dataclass(frozen=True)
class NormConfig:
    kind: NormKind = "batch"
    # after_activation: Linear -> act -> BN, as the article's Keras code (Dense(128, relu), then BN).
    # before_activation: Linear -> BN -> act, the article's equation 6, a = f(gamma * x_hat + beta).
    position: NormPosition = "after_activation"
    eps: float = 1e-3
    # PyTorch convention: weight of the new batch. None = cumulative average (1 / num_batches_tracked).
    momentum: float | None = 0.01
    affine: bool = True
    track_running_stats: bool = True
    # Keras' center (β) and scale (γ) when they differ from `affine`; None = as `affine`.
    center: bool | None = None
    scale: bool | None = None
    num_groups: int = 32  # group: the GroupNorm paper's default G
    virtual_batch_size: int = 16  # ghost: samples per virtual batch
    # batch_renorm (Ioffe 2017): final clipping limits and the warm-up schedule, in training steps:
    # plain BN (rmax=1, dmax=0) for `renorm_warmup_steps`, then linear ramps that reach rmax at
    # `renorm_rmax_steps` and dmax at `renorm_dmax_steps` (the paper: 5k, 40k, 25k).
    rmax: float = 3.0
    dmax: float = 5.0
    renorm_warmup_steps: int = 5000
    renorm_rmax_steps: int = 40000
    renorm_dmax_steps: int = 25000
    # batch_layer: the B of its formula, the training batch size (the authors' layer takes it too).
    bln_batch_size: int | None = None
    # noisy_batch (Santurkar et al. 2018 §3.1): after BN, per-activation noise N(m, s²) whose mean
    # m ~ U(−noise_mean, noise_mean) and scale s ~ U(0, noise_std) are drawn per channel at every step.
    noise_mean: float = 0.5
    noise_std: float = 1.0
    # Inference example weighing (Summers & Dinneen 2020): at eval, BN's statistics mix the example's
    # own with weight α and the population's with 1 − α. 0: plain BN (what older configs trained).
    example_weight: float = 0.0
    # rnn with kind batch or batch_layer: time steps with their own statistics; later steps use the
    # last one's (Cooijmans et al. 2016). None: the sequence's length.
    max_steps: int | None = None

    @property
    def learns_beta(self) -> bool:
        return self.affine if self.center is None else self.center

    @property
    def learns_gamma(self) -> bool:
        return self.affine if self.scale is None else self.scale


@dataclass(frozen=True)
class ModelConfig:
    arch: Arch = "mlp"
    input_shape: tuple[int, ...] = (1, 28, 28)
    num_classes: int = 10
    # How serving reads inputs as training did: pixels take values in [0, 1] (or UINT8 0..255),
    # features (MNIST-1D, float uploads) any finite numbers. Older configs lack it: pixels.
    input_kind: InputKind = "pixels"
    hidden: tuple[int, ...] = (128,)  # mlp: hidden Linear widths
    activation: Activation = "relu"
    norm: NormConfig = field(default_factory=NormConfig)
    channels: tuple[int, ...] = (32, 64)  # cnn: conv widths, one Conv-Norm-Act block each
    dropout: float = 0.0
    dropout_position: DropoutPosition = "after_norm"
    init: Init = "pytorch"
    init_scale: float = 1.0  # multiplies every initial Linear/Conv weight (the init-scale experiment)
    # resnet and resmlp only (the others ignore them): depth counts the weight layers on the longest
    # path, stem and classifier included (resnet 6n+2, resmlp 2·blocks+2); width is a resnet's first
    # stage channels (then 2×, 4×), a resmlp's hidden width.
    depth: int = 20
    width: int = 16
    block: BlockKind = "post_activation"
    shortcut: Shortcut = "zero_pad"
    residual_init: ResidualInit = "default"
    # rnn only (the others ignore them): the cell, its hidden state's size and the stacked layers.
    cell: Cell = "lstm"
    hidden_size: int = 128
    layers: int = 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        fields = dict(data)
        for name in ("input_shape", "hidden", "channels"):
            if name in fields:
                fields[name] = tuple(fields[name])
        fields["norm"] = NormConfig(**fields["norm"])
        return cls(**fields)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    batch_size: int = 32
    optimizer: OptimizerName = "adam"
    lr: float = 1e-3
    seed: int = 0
    momentum: float = 0.9  # SGD's momentum
    weight_decay: float = 0.0  # L2 added to the gradient (torch's Adam and SGD `weight_decay`)
    adam_eps: float = 1e-8  # PyTorch's default; Keras' is 1e-7
    # Learning rate per epoch: none = constant; step = lr·gamma^⌊(epoch−1)/step_size⌋;
    # cosine = lr·(1 + cos(π·(epoch−1)/epochs))/2, from lr at epoch 1 down towards 0.
    schedule: ScheduleKind = "none"
    step_size: int = 10
    gamma: float = 0.1
    # Data-parallel training (distributed.train_distributed): each of `processes` processes (on the
    # CPU, or one GPU each) takes a shard of every batch; 1 = the ordinary single-process loop.
    processes: int = 1
    # With processes > 1: BatchNorm normalises with the statistics of the global batch (SyncBatchNorm)
    # rather than of each shard, as one process over the whole batch would.
    sync_batch_norm: bool = False
    # The epoch-end probes to record besides the slot inputs' mean and std (PROBE_NAMES).
    probes: tuple[ProbeName, ...] = DEFAULT_PROBES
    # Training switches (docs/training-switches.md); each default trains as runs did before it existed.
    # Adaptive gradient clipping (Brock et al. 2021b) at this λ, all but the head; None: off.
    agc: float | None = None
    # FrozenBN (Wu & Johnson 2021) for the last N epochs: BN layers in eval mode while the rest trains.
    frozen_bn_epochs: int = 0
    # Which parameters train (Frankle et al. 2021; service/ml/trainable.py): all, norm_only (γ, β and the
    # output layer) or random_subset (as many randomly chosen scalars, through a gradient mask).
    trainable: Trainable = "all"
    # The epoch's sample order (service/ml/batch_order.py): shuffled (uniform), class_sorted, or
    # k_classes (each batch from `batch_classes` classes).
    batch_order: BatchOrder = "shuffled"
    batch_classes: int = 2
