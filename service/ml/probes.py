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

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

# Samples in the probe batch: enough for stable moments, cheap next to an epoch (one eval forward).
PROBE_SAMPLES = 256


@dataclass(frozen=True)
class SlotStatistics:
    epoch: int  # 0 = the freshly initialised network, k = after epoch k
    layer: str  # the slot's module name in the network, e.g. "bn1"
    input_mean: float  # over every sample and unit of the slot's input on the probe batch
    input_std: float  # population standard deviation over the same values


def probe_slot_inputs(
    model: nn.Module, slots: Sequence[tuple[str, nn.Module]], probe: torch.Tensor, epoch: int
) -> tuple[SlotStatistics, ...]:
    """Mean and std of each slot's input when `model` (in eval mode) sees the float batch `probe`."""
    if not slots:
        return ()
    seen: dict[str, tuple[float, float]] = {}

    def recorder(name: str) -> Any:
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            values = args[0].detach().double()
            seen[name] = (values.mean().item(), values.std(unbiased=False).item())

        return hook

    handles = [module.register_forward_pre_hook(recorder(name)) for name, module in slots]
    was_training = model.training
    try:
        model.eval()  # on purpose: train mode would move BN's running statistics
        with torch.inference_mode():
            model(probe)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return tuple(SlotStatistics(epoch, name, *seen[name]) for name, _ in slots if name in seen)
