"""The cost model: how long an experiment's runs take on a worker, estimated before they start.

A training step through autograd costs a fixed part (the optimizer, the loss, the loop), a part per
module call (PyTorch's Python and dispatch overhead, forward and backward: what dominates small and
deep networks) and a part per floating-point operation (what dominates convolutions and wide
layers); validation costs the module calls and the flops of a forward pass per batch. Module calls
and flops are counted in passes of the exact network (an LSTM's cell once per time step),
so one set of constants covers every architecture. The MLPs the compiled fast path trains
(service/ml/fastpath.py) have constants of their own.

The constants are measured by `bench/cost_model.py` (one training process, one thread, as `make
run`'s workers train a grid), which fits them by least squares and prints them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from service.config import get_settings
from service.experiments.grid import expand
from service.experiments.schemas import ExperimentCreate
from service.ml import nets, probes, training
from service.ml.config import ModelConfig, OptimizerName, TrainConfig
from service.ml.datasets import BUILTIN_SHAPES, DataShape, split_sizes
from service.runs.schemas import RunCreate
from service.runs.spec import DEFAULT_SHAPE, model_config, train_config

# Measured by bench/cost_model.py: 2 cores of an Intel Xeon, torch 2.13, one thread.
# Autograd step: fixed + per torch call (nets.forward_profile counts them) + per flop of forward and
# backward (3 forward passes), with a rate of its own for Linear, convolution and elementwise flops.
STEP_FIXED_S = 0.000202
STEP_PER_CALL_S = 0.0000122
STEP_PER_LINEAR_FLOP_S = 1 / 3.852e11
STEP_PER_CONV_FLOP_S = 1 / 1.024e11
STEP_PER_OTHER_FLOP_S = 1 / 7.729e09
# Each convolution's set-up of its kernels, forward and backward, whatever its size.
STEP_PER_CONV_LAYER_S = 0.0005367
# The optimizer's update, per trainable parameter (zero for the probes' passes, which update nothing).
STEP_PER_PARAMETER_S: dict[OptimizerName, float] = {"adam": 3.479e-09, "sgd": 3.283e-09}
# The fast path's step (MLPs, service/ml/fastpath.py): fixed + per hidden layer (more when it is
# normalised) + per flop + the update per parameter (the article's MLP: 0.29-0.32 ms at batch 32).
FAST_STEP_FIXED_S = 0.000007
FAST_STEP_PER_LAYER_S = 0.0000124
FAST_STEP_PER_NORM_LAYER_S = 0.0000290
FAST_STEP_PER_LINEAR_FLOP_S = 1 / 1.844e11
FAST_STEP_PER_OTHER_FLOP_S = 1 / 1.466e10
FAST_STEP_PER_PARAMETER_S: dict[OptimizerName, float] = {"adam": 1.148e-09, "sgd": 9.938e-10}
# Validation, per batch (training.evaluation_batch_size: up to 1,024 samples, fewer where a layer's
# outputs would leave the caches): fixed + per torch call; per sample: per flop of the forward pass.
# Fitted when every network validated 1,024 samples a batch: convolutions validate faster in their
# sized batches, so deep conv nets' validation is overpriced (a ResNet-20's about 1.5-2x); one rate per
# conv flop does not fit both a CNN whose first convolution has one input channel and a ResNet.
VAL_FIXED_S = 0.000000
VAL_PER_CALL_S = 0.0000098
VAL_PER_LINEAR_FLOP_S = 1 / 1.647e11
VAL_PER_CONV_FLOP_S = 1 / 3.273e10
VAL_PER_OTHER_FLOP_S = 1 / 1.516e10
# The probes against the passes they make (measured in-process on MLPs of 10 and 100 layers, a
# residual MLP and a CNN): the gradients probe's per-layer norms cost about as much again as its
# pass. The percentiles make no pass of their own in training (they read the slots' inputs that the
# slot statistics' pass captured): their quantiles cost 0.5-0.6 of that pass (bench/probe_costs.py,
# the article's MLP and a 100-layer one).
PROBE_GRADIENTS_FACTOR = 1.8
PROBE_PERCENTILES_FACTOR = 0.6
# Measured on the replication cards' runs (their rows' timestamps): a run's set-up and end outside its
# epochs take about 0.03 s and a worker's pick-up of the next run 0.04 s (with the embedded broker
# polled every 50 ms; every 10 ms now, a grid's hand-overs measure 0.015-0.025 s: kept until the
# cards' times are recorded again, so estimates may run long by 0.02 s a run); between two epochs,
# besides the probes, recording the epoch takes about 0.01 s.
RUN_OVERHEAD_S = 0.07
EPOCH_OVERHEAD_S = 0.01
# Each epoch's training state (weights and optimizer moments, BNLAB_KEEP_CHECKPOINTS=epoch), serialised
# and written to the database: measured 3-6 ns a byte (MLPs of 0.1-1.8 M parameters, SQLite).
STATE_PER_BYTE_S = 4.5e-9
# Creating the experiment and publishing its runs, and the report at its end.
EXPERIMENT_OVERHEAD_S = 0.3


def estimated_seconds(spec: ExperimentCreate, processes: int = 1) -> int:
    """Wall time of the experiment's runs, spread over the worker's `processes` training processes:
    their total shared out, but never less than its longest run (which one process trains alone),
    and the experiment's own start and end. Shared out run by run, the processes do not finish
    together: at the end the others wait for the last one, on average half a run each, which puts
    the end (processes − 1) / processes of half a run after an even share."""
    runs = [run_seconds(planned.spec) for planned in expand(spec)]
    half_run = sum(runs) / len(runs) / 2
    shared = sum(runs) / processes + (processes - 1) / processes * half_run
    return max(1, round(EXPERIMENT_OVERHEAD_S + max(shared, max(runs))))


def run_seconds(spec: RunCreate, shape: DataShape | None = None) -> float:
    """One run: its epochs' steps and validation, and the per-run and per-epoch overheads. `shape`:
    its data's (loading.data_shape); without it an upload is priced as Fashion-MNIST."""
    dataset, train = spec.dataset, spec.train
    shape = shape or BUILTIN_SHAPES.get(dataset.name, DEFAULT_SHAPE)
    n = dataset.limit or shape.train_samples
    n_train, n_val = split_sizes(n, dataset.val_split)
    steps = math.ceil(n_train / train.batch_size)
    cfg, tcfg = model_config(spec, shape), train_config(spec)
    fast = not training.needs_autograd(tcfg) and training.trains_fast(cfg)
    step_s = step_seconds(cfg, train.batch_size, fast=fast, optimizer=tcfg.optimizer)
    epoch_s = steps * step_s + validation_seconds(cfg, n_val)
    # The probes run at initialisation (epoch 0) and after every epoch.
    probes_s = (train.epochs + 1) * probe_seconds(cfg, tcfg.probes, min(n_train, probes.STATISTICS_SAMPLES))
    # Every epoch's training state is stored but the last one's (the final model follows at once).
    states_s = (train.epochs - 1) * state_seconds(cfg, tcfg)
    return RUN_OVERHEAD_S + train.epochs * (epoch_s + EPOCH_OVERHEAD_S) + states_s + probes_s


def state_seconds(cfg: ModelConfig, tcfg: TrainConfig) -> float:
    """Storing an epoch's training state: float32 weights and the optimizer's moments (Adam two,
    SGD one with momentum), when epochs' states are kept."""
    if get_settings().keep_checkpoints != "epoch":
        return 0.0
    moments = 2 if tcfg.optimizer == "adam" else int(tcfg.momentum > 0)
    return STATE_PER_BYTE_S * 4 * (1 + moments) * nets.parameter_count(cfg)


def step_seconds(cfg: ModelConfig, batch: int, *, fast: bool, optimizer: OptimizerName | None) -> float:
    """A training step's forward and backward pass, and the optimizer's update unless it is None."""
    p = nets.forward_profile(cfg)
    if fast:  # the fast path trains MLPs: no convolutions
        per_sample = _flop_seconds(p, FAST_STEP_PER_LINEAR_FLOP_S, 0.0, FAST_STEP_PER_OTHER_FLOP_S)
        update = FAST_STEP_PER_PARAMETER_S[optimizer] if optimizer else 0.0
        per_layer = FAST_STEP_PER_LAYER_S + (FAST_STEP_PER_NORM_LAYER_S if cfg.norm.kind != "none" else 0.0)
        passes = FAST_STEP_FIXED_S + per_layer * len(cfg.hidden) + 3 * batch * per_sample
    else:
        per_sample = _flop_seconds(p, STEP_PER_LINEAR_FLOP_S, STEP_PER_CONV_FLOP_S, STEP_PER_OTHER_FLOP_S)
        update = STEP_PER_PARAMETER_S[optimizer] if optimizer else 0.0
        per_step = STEP_FIXED_S + STEP_PER_CALL_S * p.calls + STEP_PER_CONV_LAYER_S * p.conv_layers
        passes = per_step + 3 * batch * per_sample
    return passes + update * nets.parameter_count(cfg)


def probe_seconds(cfg: ModelConfig, names: Sequence[str], training_samples: int) -> float:
    """One round of the probes (service/ml/probes.py) on the PROBE_SAMPLES probe batch: the slots'
    inputs a forward pass (whose captured inputs the percentiles sort), the gradients a forward and
    backward pass, the smoothness one per step size and one more, the statistics gap a forward pass
    over the training samples it reads and two over the probe batch."""
    forward = validation_seconds(cfg, probes.PROBE_SAMPLES)
    backward = step_seconds(cfg, probes.PROBE_SAMPLES, fast=False, optimizer=None)
    costs = {
        "gradients": PROBE_GRADIENTS_FACTOR * backward,
        "smoothness": (1 + len(probes.STEP_FRACTIONS)) * PROBE_GRADIENTS_FACTOR * backward,
        "percentiles": PROBE_PERCENTILES_FACTOR * forward,
        "gamma": 0.0,
        "statistics_gap": validation_seconds(cfg, training_samples) + 2 * forward,
    }
    return forward + sum(costs[name] for name in names)


def validation_seconds(cfg: ModelConfig, samples: int) -> float:
    p = nets.forward_profile(cfg)
    per_sample = _flop_seconds(p, VAL_PER_LINEAR_FLOP_S, VAL_PER_CONV_FLOP_S, VAL_PER_OTHER_FLOP_S)
    batches = math.ceil(samples / training.evaluation_batch_size(cfg))
    return batches * (VAL_FIXED_S + VAL_PER_CALL_S * p.calls) + samples * per_sample


def _flop_seconds(p: nets.ForwardProfile, linear: float, conv: float, other: float) -> float:
    """Seconds of one sample's forward flops at the given seconds per Linear, conv and other flop."""
    return linear * p.linear_flops + conv * p.conv_flops + other * p.other_flops
