"""How long a run may take, derived from its spec: the basis of its soft and hard time limits."""

from __future__ import annotations

import math

from sqlalchemy.orm import Session

from service.config import get_settings
from service.datasets import loading
from service.ml.config import ModelConfig
from service.ml.datasets import split_sizes
from service.ml.nets import forward_profile
from service.runs.schemas import RunCreate
from service.runs.spec import model_config

# Generous on purpose: the limit exists to catch hung jobs, not to race slow machines.
STARTUP_ALLOWANCE_S = 300
SECONDS_PER_STEP_OVERHEAD = 0.02
# Per layer call of a step (forward and backward): dispatch overhead, what dominates deep and recurrent
# networks (an rnn calls its cell's layers at every time step); five times the cost model's figure.
SECONDS_PER_CALL = 0.0002
# One pessimistic GFLOP/s for the flops of a training step.
FLOPS_PER_SECOND = 1e9
# A training step costs its forward pass and a backward pass of about twice that (for an mlp this is
# the familiar 6·params·batch); counting the forward pass per layer is what makes convolutions fair:
# a conv's flops scale with its feature map, not with its few parameters.
FORWARD_AND_BACKWARD = 3
# A data-parallel run (train.processes > 1) exchanges gradients and, with norm.sync, BN statistics at
# every step over gloo: measured ≈ 7.5× slower per epoch than one process for the article's MLP
# (0.45 s vs 0.06 s), plus ≈ 2.5 s to start the ranks. Both are rounded up generously.
DISTRIBUTED_SLOWDOWN = 15
DISTRIBUTED_STARTUP_S = 60


def time_limit_s(spec: RunCreate, *, cap_s: int, model: ModelConfig, train_samples: int) -> int:
    """`model`: the spec's network on its data (shape included); `train_samples` the size of that data."""
    samples = spec.dataset.limit or train_samples
    steps_per_epoch = math.ceil(split_sizes(samples, spec.dataset.val_split)[0] / spec.train.batch_size)
    profile = forward_profile(model)
    step_flops = FORWARD_AND_BACKWARD * profile.flops * spec.train.batch_size
    step_s = SECONDS_PER_STEP_OVERHEAD + profile.calls * SECONDS_PER_CALL + step_flops / FLOPS_PER_SECOND
    training_s = spec.train.epochs * (steps_per_epoch * step_s + 5)
    if spec.train.processes > 1:
        training_s = training_s * DISTRIBUTED_SLOWDOWN + DISTRIBUTED_STARTUP_S
    budget = STARTUP_ALLOWANCE_S + training_s
    return min(cap_s, math.ceil(budget))


def run_time_limit_s(spec: RunCreate, *, session: Session) -> int:
    cap_s = get_settings().max_run_seconds
    try:
        shape = loading.data_shape(session=session, dataset=spec.dataset)
    except loading.UnknownDataset:
        return cap_s  # an upload deleted since submission: the run fails as it loads its data
    model = model_config(spec, shape)
    return time_limit_s(spec, cap_s=cap_s, model=model, train_samples=shape.train_samples)
