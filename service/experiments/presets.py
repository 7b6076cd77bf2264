"""Ready-made experiments, each testing one claim of the article (or of the papers it cites).

Each preset is an experiment spec plus claims, written as contrasts of configuration means that
`service.experiments.grid.judge` rules on with one fixed rule (VERDICT_RULE): no preset tunes it.

Sizes: each preset should train in well under a minute on a 2-core CPU with `make run`'s worker.
`seed-keras` is the article's exact experiment (full dataset, 10 epochs, batch 32) and takes longest.
The time estimate is a cost model (per-step time by training path + per-run overhead, spread over the
training processes) measured through that worker.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from service.experiments.grid import expand
from service.experiments.report import Claim, Term
from service.experiments.schemas import ExperimentCreate, PresetCreate
from service.ml import recurrent, training
from service.ml.datasets import BUILTIN_SHAPES, split_sizes
from service.runs.schemas import BuiltinDatasetName, ModelSpec, RunCreate
from service.runs.spec import DEFAULT_SHAPE, model_config, train_config

# Seconds per optimiser step, measured through `make run`'s worker (one thread per training process,
# both processes busy; torch 2.13, 2-core machine): the compiled fast path that MLPs with BN or no
# norm train through (service/ml/fastpath.py) ≈ 0.25 ms + 5 µs a sample (0.41 ms at batch 32);
# autograd, for the other norms, ≈ 0.75 ms + 6 µs a sample.
FAST_STEP_FIXED_S, FAST_STEP_PER_SAMPLE_S = 0.00025, 0.000005
STEP_FIXED_S, STEP_PER_SAMPLE_S = 0.00075, 0.000006
# The small CNN (3 × 3 convs at full resolution), autograd: ≈ 5.5 ms + 1.15 ms a sample for channels
# (16, 32), one thread, measured on the 2-core machine while other jobs kept its load average near 13:
# likely 2–4× a quiet machine's figure (the MLP constants above came from a quieter machine);
# the per-sample cost grows as (Σ c_in·c_out)^0.8 (channels (32, 64): 3.3 ms measured, 3.4 modelled).
# Validation ≈ 1 ms a sample for (16, 32), on the same scale.
CNN_STEP_FIXED_S, CNN_STEP_PER_SAMPLE_S, CNN_VAL_PER_SAMPLE_S = 0.0055, 0.00115, 0.001
CNN_REFERENCE_MACS = 1 * 16 + 16 * 32
# Deep MLPs (depth × width, resmlp): each hidden layer past the second adds ≈ 0.87 ms a step at batch 64
# and width 64, measured at load ≈ 10 on the 2-core machine, where the 2-layer MLP's step took 3.9 ms
# against the 0.57 ms the constants above give: so ≈ 0.12 ms on a quiet machine, 2 µs a sample, scaled
# by (width / 64)². Validation: a tenth of that.
DEEP_LAYER_PER_SAMPLE_S = 0.000002
DEEP_LAYER_VAL_PER_SAMPLE_S = 0.0000002
# An rnn (autograd, one Python iteration per time step): per time step and layer ≈ 1.1 ms + 45 µs a
# sample at hidden_size 64 for an LSTM with recurrent BN (16 → 47.6 ms, 64 → 91 ms, 128 → 196 ms a step
# over 28 steps), the per-sample part ≈ proportional to hidden_size (128: 140 ms at batch 64); layer norm
# and none cost ≈ 75 % and 50 % of that (charged as BN: the estimate is an upper bound). Validation
# ≈ 10 µs a sample per time step and layer. Measured with one thread at load average ≈ 8.5 on the
# 2-core machine, kept as measured (as the CNN's figures).
RNN_STEP_FIXED_S, RNN_STEP_PER_SAMPLE_S, RNN_VAL_PER_SAMPLE_S = 0.0011, 0.000045, 0.00001
# Queue pick-up, loading and recording per run; the validation pass per epoch, per sample.
RUN_OVERHEAD_S = 0.25
VAL_PER_SAMPLE_S = 0.000002
FULL_TRAIN_SIZE = 60_000
SYNTHETIC_TRAIN_SIZE = 10_000


@dataclass(frozen=True)
class Preset:
    name: str
    claim: str
    # The experiment spec, without dataset name: `dataset` picks it (first installed of the list).
    spec: dict[str, Any]
    datasets: tuple[BuiltinDatasetName, ...]
    claims: tuple[Claim, ...]
    notes: str = ""
    seeds: tuple[int, ...] = field(default=(0, 1, 2))


def _none_vs_batch(sentence: str, metric: str, match: dict[str, Any] | None = None) -> Claim:
    """`batch` beats `none` on the metric (lower loss, higher accuracy), optionally at fixed values."""
    sign = 1.0 if metric.endswith("accuracy") else -1.0
    extra = match or {}
    return Claim(
        sentence=sentence,
        metric=metric,
        terms=(
            Term({"model.norm.kind": "batch", **extra}, sign),
            Term({"model.norm.kind": "none", **extra}, -sign),
        ),
        contrast="batch − none" if sign > 0 else "none − batch",
    )


def _less_drop(sentence: str, metric: str, key: str, good: Any, bad: Any, a: str, b: str) -> Claim:
    """Norm `a` loses less of `metric` than norm `b` when `key` goes from `good` to `bad`:
    (a@bad − a@good) − (b@bad − b@good) > 0 (accuracy)."""
    norm = "model.norm.kind"
    return Claim(
        sentence=sentence,
        metric=metric,
        terms=(
            Term({norm: a, key: bad}, 1.0),
            Term({norm: a, key: good}, -1.0),
            Term({norm: b, key: bad}, -1.0),
            Term({norm: b, key: good}, 1.0),
        ),
        contrast=f"({a} drop) − ({b} drop), as accuracy change {key} {good}→{bad}",
    )


SEED_KERAS = Preset(
    name="seed-keras",
    claim="The article's experiment: Flatten → Dense(128, relu) → [BN] → Dense(10), 10 epochs, batch 32, "
    "Adam 1e-3, validation_split 0.2, Keras semantics; does BN lower the validation loss?",
    spec={
        "name": "With and Without Batch Normalization",
        "base": {
            "compat": "keras",
            "model": {"hidden": [128], "activation": "relu", "norm": {"position": "after_activation"}},
            "train": {"epochs": 10, "batch_size": 32, "optimizer": "adam", "lr": 0.001},
        },
        "grid": {"model.norm.kind": ["none", "batch"]},
        "target": 0.85,
    },
    datasets=("mnist", "fashion-mnist"),
    claims=(
        _none_vs_batch("Batch normalization lowers the final validation loss.", "final.val_loss"),
        _none_vs_batch("Batch normalization raises the final validation accuracy.", "final.val_accuracy"),
        _none_vs_batch(
            "Batch normalization trains faster: a lower training loss after the same epochs.",
            "final.train_loss",
        ),
    ),
    notes="The article used MNIST; without it installed, Fashion-MNIST.",
)

HIGHER_LR = Preset(
    name="higher-lr",
    claim="BN tolerates larger learning rates (BN paper §3.3): at a high SGD learning rate the BN "
    "network still trains, and it loses less accuracy than the plain one as the rate grows.",
    spec={
        "name": "Higher learning rates",
        "base": {
            "dataset": {"limit": 10000},
            "model": {"hidden": [128, 128], "activation": "relu", "norm": {"position": "before_activation"}},
            "train": {"epochs": 4, "batch_size": 32, "optimizer": "sgd", "momentum": 0.9},
        },
        "grid": {"model.norm.kind": ["none", "batch"], "train.lr": [0.01, 0.3]},
        "target": 0.8,
    },
    datasets=("fashion-mnist", "synthetic"),
    claims=(
        _none_vs_batch(
            "At learning rate 0.3, BN reaches a higher validation accuracy than no normalization.",
            "final.val_accuracy",
            {"train.lr": 0.3},
        ),
        _less_drop(
            "Raising the learning rate from 0.01 to 0.3 costs BN less validation accuracy than no "
            "normalization.",
            "final.val_accuracy",
            "train.lr",
            0.01,
            0.3,
            "batch",
            "none",
        ),
    ),
)

SMALL_BATCH = Preset(
    name="small-batch",
    claim="BN degrades at batch 2–4, while GroupNorm and LayerNorm, whose statistics are per sample, "
    "do not (GroupNorm paper).",
    spec={
        "name": "Small batches",
        "base": {
            "dataset": {"limit": 3000},
            "model": {"hidden": [128], "activation": "relu", "norm": {"num_groups": 16}},
            "train": {"epochs": 3, "optimizer": "adam", "lr": 0.001},
        },
        "grid": {"model.norm.kind": ["batch", "group", "layer"], "train.batch_size": [2, 4, 64]},
        "target": 0.75,
    },
    datasets=("fashion-mnist", "synthetic"),
    claims=tuple(
        Claim(
            sentence=f"At batch {batch}, {name} reaches a higher validation accuracy than BN.",
            metric="final.val_accuracy",
            terms=(
                Term({"model.norm.kind": kind, "train.batch_size": batch}, 1.0),
                Term({"model.norm.kind": "batch", "train.batch_size": batch}, -1.0),
            ),
            contrast=f"{kind} − batch at batch {batch}",
        )
        for batch in (2, 4)
        for kind, name in (("group", "GroupNorm"), ("layer", "LayerNorm"))
    )
    + (
        _less_drop(
            "Going from batch 64 to batch 2 costs GroupNorm less validation accuracy than BN.",
            "final.val_accuracy",
            "train.batch_size",
            64,
            2,
            "group",
            "batch",
        ),
    ),
)

DEEP_SIGMOID = Preset(
    name="deep-sigmoid",
    claim="BN rescues a deep sigmoid MLP (BN paper §4.1: 3 × 100 sigmoid units, batch 60, BN before "
    "each nonlinearity, plain SGD).",
    spec={
        "name": "Deep sigmoid MLP",
        "base": {
            "dataset": {"limit": 12000},
            "model": {
                "hidden": [100, 100, 100],
                "activation": "sigmoid",
                "norm": {"position": "before_activation"},
            },
            "train": {"epochs": 5, "batch_size": 60, "optimizer": "sgd", "lr": 0.5, "momentum": 0.0},
        },
        "grid": {"model.norm.kind": ["none", "batch"]},
        "target": 0.8,
    },
    datasets=("mnist", "fashion-mnist", "synthetic"),
    claims=(
        _none_vs_batch(
            "With BN before each sigmoid, the network reaches a higher validation accuracy.",
            "final.val_accuracy",
        ),
        _none_vs_batch(
            "With BN, the best validation accuracy over the epochs is higher.", "best.val_accuracy"
        ),
    ),
)

INIT_SCALE = Preset(
    name="init-scale",
    claim="BN makes training less sensitive to the scale of the initial weights (BN((aW)u) = BN(Wu)).",
    spec={
        "name": "Initialisation scale",
        "base": {
            "dataset": {"limit": 12000},
            "model": {"hidden": [128, 128], "activation": "relu", "norm": {"position": "before_activation"}},
            "train": {"epochs": 5, "batch_size": 32, "optimizer": "sgd", "lr": 0.05, "momentum": 0.9},
        },
        "grid": {"model.norm.kind": ["none", "batch"], "model.init_scale": [0.1, 1.0, 5.0]},
        "target": 0.75,
    },
    datasets=("fashion-mnist", "synthetic"),
    # Sized when a step was several times slower: 6 000 samples, 3 epochs and 3 seeds left the
    # seed-to-seed spread at init scale 5 (±0.07 without BN) as large as the effect. 5 seeds of
    # 12 000 samples, 5 epochs: 30 runs, about 14 s through make run's worker.
    seeds=(0, 1, 2, 3, 4),
    claims=tuple(
        _less_drop(
            f"Scaling the initial weights by {scale} instead of 1 costs BN less validation accuracy than "
            "no normalization.",
            "final.val_accuracy",
            "model.init_scale",
            1.0,
            scale,
            "batch",
            "none",
        )
        for scale in (0.1, 5.0)
    ),
)

PRESETS: dict[str, Preset] = {
    p.name: p for p in (SEED_KERAS, HIGHER_LR, SMALL_BATCH, DEEP_SIGMOID, INIT_SCALE)
}


def claims_of(preset: str | None) -> Sequence[Claim]:
    found = PRESETS.get(preset or "")
    return found.claims if found else ()


DatasetCheck = Callable[[str], bool]


def experiment_spec(
    preset: Preset, overrides: PresetCreate, dataset_available: DatasetCheck
) -> ExperimentCreate:
    """The preset's experiment with the overrides applied; the dataset is the override, else the
    first of the preset's datasets that is installed (the last one as a fallback)."""
    raw = copy.deepcopy(preset.spec)
    dataset = overrides.dataset or next(
        (d for d in preset.datasets if dataset_available(d)), preset.datasets[-1]
    )
    raw["base"].setdefault("dataset", {})["name"] = dataset
    raw["seeds"] = list(overrides.seeds or preset.seeds)
    if overrides.name:
        raw["name"] = overrides.name
    return ExperimentCreate.model_validate(raw)


def estimated_seconds(spec: ExperimentCreate, processes: int = 1) -> int:
    """Wall time from the cost model: per run, steps × step cost + validation + overhead, the runs
    spread over the worker's `processes` training processes."""
    total = 0.0
    for planned in expand(spec):
        dataset, train = planned.spec.dataset, planned.spec.train
        n = dataset.limit or (SYNTHETIC_TRAIN_SIZE if dataset.name == "synthetic" else FULL_TRAIN_SIZE)
        n_train, n_val = split_sizes(n, dataset.val_split)
        steps = -(-n_train // train.batch_size)
        val_s = VAL_PER_SAMPLE_S
        # The training switches AGC, FrozenBN and trainable train every network through autograd.
        fast = not training.needs_autograd(train_config(planned.spec))
        if planned.spec.model.arch == "rnn":
            step_s, val_s = _rnn_step_and_val_seconds(planned.spec, train.batch_size)
        elif planned.spec.model.arch == "cnn":
            scale = _cnn_macs(planned.spec.model.channels) ** 0.8
            step_s = CNN_STEP_FIXED_S + scale * CNN_STEP_PER_SAMPLE_S * train.batch_size
            val_s = scale * CNN_VAL_PER_SAMPLE_S
        elif fast and training.trains_fast(model_config(planned.spec)):
            step_s = FAST_STEP_FIXED_S + FAST_STEP_PER_SAMPLE_S * train.batch_size
        else:
            step_s = STEP_FIXED_S + STEP_PER_SAMPLE_S * train.batch_size
        extra = _extra_layer_widths(planned.spec.model)
        step_s += DEEP_LAYER_PER_SAMPLE_S * train.batch_size * extra
        val_s += DEEP_LAYER_VAL_PER_SAMPLE_S * extra
        total += RUN_OVERHEAD_S + train.epochs * (steps * step_s + n_val * val_s)
    return max(1, round(total / processes))


def _rnn_step_and_val_seconds(spec: RunCreate, batch_size: int) -> tuple[float, float]:
    """(seconds a training step, seconds a validation sample) of an rnn: time steps × layers × the
    measured cost of one step of one layer, the per-sample part scaled by hidden_size / 64."""
    model = spec.model
    shape = BUILTIN_SHAPES.get(spec.dataset.name, DEFAULT_SHAPE)
    steps, _ = recurrent.sequence_shape(tuple(shape.input_shape))
    scale = (model.hidden_size or 128) / 64
    cells = steps * (model.layers or 1)
    step_s = cells * (RNN_STEP_FIXED_S + RNN_STEP_PER_SAMPLE_S * scale * batch_size)
    return step_s, cells * RNN_VAL_PER_SAMPLE_S * scale


def _cnn_macs(channels: Sequence[int]) -> float:
    """Σ c_in·c_out over the conv layers, relative to the measured (16, 32) CNN."""
    widths = [1, *channels]
    return sum(a * b for a, b in zip(widths, widths[1:], strict=False)) / CNN_REFERENCE_MACS


def _extra_layer_widths(model: ModelSpec) -> float:
    """Σ (width / 64)² over the hidden layers past the second (mlp) or every hidden layer of a resmlp."""
    if model.arch == "mlp":
        widths = list(model.hidden)[2:]
    elif model.arch == "resmlp":
        widths = [model.width or 0] * max(0, (model.depth or 0) - 2)
    else:
        return 0.0
    return float(sum((w / 64) ** 2 for w in widths))
