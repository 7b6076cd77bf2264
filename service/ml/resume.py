"""Training state at an epoch boundary (model + optimizer), so an interrupted run resumes there.

Stored as safetensors: tensors under `model.<key>` and `optim.<param index>.<key>`, everything else
(param groups, non-tensor state values, the epoch) as JSON metadata. Never pickled.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import safetensors.torch
import torch
from torch import nn

from service.ml.checkpoints import tensor_bytes

FORMAT = "bnlab-training-state-v1"


class ResumeError(Exception):
    """The stored training state does not fit this run's model and optimizer."""


@dataclass(frozen=True)
class TrainingState:
    """Decoded training state: the epoch it was taken after, and the two state dicts."""

    epoch: int
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any]


def save_training_state(model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int) -> bytes:
    return encode_training_state(TrainingState(epoch, model.state_dict(), optimizer.state_dict()))


def encode_training_state(state: TrainingState) -> bytes:
    """The bytes `load_training_state` decodes: a state taken from a model and its optimizer, or one
    decoded before (the data-parallel launcher hands a resume state on to its ranks this way)."""
    tensors = {f"model.{k}": v for k, v in state.model_state.items()}
    optim = state.optimizer_state
    scalars: dict[str, dict[str, Any]] = {}
    for index, entry in optim["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    metadata = {
        "format": FORMAT,
        "epoch": str(state.epoch),
        "param_groups": json.dumps(optim["param_groups"]),
        "state_scalars": json.dumps(scalars),
    }
    return tensor_bytes(tensors, metadata)


def load_training_state(data: bytes) -> TrainingState:
    try:
        tensors = safetensors.torch.load(data)
        metadata = _metadata(data)
        if metadata.get("format") != FORMAT:
            raise ResumeError(f"not a bnlab training state (format {metadata.get('format')!r})")
        param_groups = json.loads(metadata["param_groups"])
        scalars: dict[str, dict[str, Any]] = json.loads(metadata["state_scalars"])
        epoch = int(metadata["epoch"])
    except ResumeError:
        raise
    except Exception as exc:  # safetensors and json raise several types for malformed bytes
        raise ResumeError(f"training state cannot be read: {exc}") from exc
    model_state = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    for index, entries in scalars.items():
        state.setdefault(int(index), {}).update(entries)
    return TrainingState(epoch, model_state, {"state": state, "param_groups": param_groups})


def restore(state: TrainingState, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load both state dicts; a mismatch (another architecture or optimizer) is a ResumeError."""
    _check_param_groups(state, optimizer)
    try:
        model.load_state_dict(state.model_state, strict=True)
        optimizer.load_state_dict(state.optimizer_state)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise ResumeError(f"training state does not fit this run: {exc}") from exc


def _check_param_groups(state: TrainingState, optimizer: torch.optim.Optimizer) -> None:
    """Refuse a state whose optimizer had another number of param groups, saying why it happens.

    The one case a user meets: a Fixup network's training state saved by a bnlab that trained its
    scalars in the one group with its weights. Mapping it into this bnlab's two groups would be
    possible, but the run would then have trained its scalars at the full rate until the restart and
    at a tenth of it after: neither recipe. It is refused, and the run is submitted again."""
    stored, built = len(state.optimizer_state["param_groups"]), len(optimizer.param_groups)
    if stored == built:
        return
    raise ResumeError(
        f"training state does not fit this run: it was saved with {stored} optimizer param group(s) "
        f"and this run's optimizer has {built}. A Fixup network saved by an older bnlab, which trained "
        "its scalar biases and multipliers in one group with the weights, cannot resume now that they "
        "train in a group of their own at a tenth of the rate (the run would mix both recipes): "
        "submit the run again"
    )


def _metadata(data: bytes) -> dict[str, str]:
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    metadata: dict[str, str] = header.get("__metadata__", {})
    return metadata
