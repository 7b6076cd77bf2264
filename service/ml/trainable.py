"""Which parameters a run trains (train.trainable; Frankle, Schwab & Morcos 2021, "Training BatchNorm
and Only BatchNorm: On the Expressive Power of Random Features in CNNs").

- all: every parameter.
- norm_only: only the normalisation layers' affine parameters (γ, β; every parameter of the `bnN`
  slots) and the output layer `out`, as the paper trains them (it trains the output layer too); the
  other parameters keep their random initial values, bit for bit: `requires_grad` is off for them, so
  they get no gradient and neither optimizer (nor its weight decay) touches them.
- random_subset: the paper's control: as many scalars as norm_only would train, chosen uniformly at
  random among all the network's scalars (elementwise, drawn from the run's seed), trained through a
  gradient mask: a hook on each parameter multiplies its gradient by a 0/1 tensor before it is
  accumulated (so data-parallel ranks all-reduce the masked gradient). With a zero gradient, Adam's
  and SGD's moments stay zero and the unchosen scalars do not move; torch's coupled weight decay
  would move them, so the spec rejects weight_decay > 0 with random_subset.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import nn

from service.ml.config import ModelConfig, Trainable
from service.ml.nets import make_net, norm_slots

HEAD = "out"  # the output layer, trained by norm_only too


def norm_only_names(model: nn.Module) -> set[str]:
    """The parameters norm_only trains: every parameter of the norm slots, and the head's."""
    slots = {name for name, _ in norm_slots(model)}
    return {name for name, _ in model.named_parameters() if name.split(".")[0] in slots | {HEAD}}


def norm_only_count(model: nn.Module) -> int:
    """The scalars norm_only trains (and random_subset draws)."""
    names = norm_only_names(model)
    return sum(p.numel() for name, p in model.named_parameters() if name in names)


@functools.lru_cache(maxsize=256)
def norm_parameter_count(cfg: ModelConfig) -> int:
    """Scalars of the norm slots of `make_net(cfg)` alone (without the head), counted on the meta device;
    0 when the norm kind has no affine parameters."""
    with torch.device("meta"):
        model = make_net(cfg)
    slots = {name for name, _ in norm_slots(model)}
    return sum(p.numel() for name, p in model.named_parameters() if name.split(".")[0] in slots)


def random_masks(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """random_subset's 0/1 gradient mask per parameter: norm_only_count(model) scalars, drawn uniformly
    without replacement over all of them in named_parameters order, from (seed, a fixed tag)."""
    params = list(model.named_parameters())
    total = sum(p.numel() for _, p in params)
    (state,) = np.random.SeedSequence([seed, 21]).generate_state(1, dtype=np.uint64)
    chosen = torch.randperm(total, generator=torch.Generator().manual_seed(int(state)))[
        : norm_only_count(model)
    ]
    flat = torch.zeros(total)
    flat[chosen] = 1.0
    masks, offset = {}, 0
    for name, p in params:
        masks[name] = flat[offset : offset + p.numel()].reshape(p.shape).to(p.device, p.dtype)
        offset += p.numel()
    return masks


def restrict_trainable(model: nn.Module, trainable: Trainable, seed: int) -> None:
    """Make `model` train only what `trainable` says (see the module's docstring); before any DDP wrap
    and before the optimizer's first step. `all` leaves the model as it is."""
    if trainable == "all":
        return
    if trainable == "norm_only":
        names = norm_only_names(model)
        for name, p in model.named_parameters():
            p.requires_grad_(name in names)
        return
    if trainable == "random_subset":
        masks = random_masks(model, seed)
        for name, p in model.named_parameters():
            p.register_hook(functools.partial(torch.mul, other=masks[name]))  # type: ignore[no-untyped-call]
        return
    raise ValueError(f"unknown trainable {trainable!r}; expected 'all', 'norm_only' or 'random_subset'")
