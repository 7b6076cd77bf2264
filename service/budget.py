"""How long a run may take, derived from its spec: the basis of its soft and hard time limits."""

from __future__ import annotations

import math

from service.schemas import RunCreate

# Generous on purpose: the limit exists to catch hung jobs, not to race slow machines.
STARTUP_ALLOWANCE_S = 300
SECONDS_PER_STEP_OVERHEAD = 0.02
# One pessimistic GFLOP/s for the 6·params·batch flops of a training step.
FLOPS_PER_SECOND = 1e9
def time_limit_s(spec: RunCreate, *, cap_s: int, parameters: int, train_samples: int) -> int:
    """`parameters` of the spec's network on its data; `train_samples` the size of that data."""
    samples = spec.dataset.limit or train_samples
    steps_per_epoch = math.ceil(samples * (1 - spec.dataset.val_split) / spec.train.batch_size)
    step_s = SECONDS_PER_STEP_OVERHEAD + 6 * parameters * spec.train.batch_size / FLOPS_PER_SECOND
    budget = STARTUP_ALLOWANCE_S + spec.train.epochs * (steps_per_epoch * step_s + 5)
    return min(cap_s, math.ceil(budget))
