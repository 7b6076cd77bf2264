"""Checkpoints: safetensors bytes of a state_dict, with the ModelConfig that rebuilds the network.

safetensors holds raw tensors and a JSON header, nothing executable; torch.load and pickle are never
used, so a checkpoint uploaded by a user cannot run code. Loading checks every key, shape, dtype and
value against a freshly built network before any weight is copied.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import safetensors.numpy
import safetensors.torch
import torch
from torch import nn

from service.ml.config import ModelConfig
from service.ml.nets import make_net

FORMAT = "bnlab-checkpoint-v1"
# Our headers are a few kB (one entry per tensor + the config); anything this large is not ours.
MAX_HEADER_BYTES = 1 << 20


class CheckpointError(Exception):
    """The bytes are not a usable bnlab checkpoint; the message says why."""


def save_checkpoint(model: nn.Module, cfg: ModelConfig) -> bytes:
    metadata = {"format": FORMAT, "model_config": json.dumps(cfg.to_dict())}
    return tensor_bytes(model.state_dict(), metadata)


def tensor_bytes(tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """The safetensors bytes of `tensors` (copied to the CPU, contiguous). Written through numpy when
    every dtype has a numpy twin: the same bytes in a third of the time, since torch's writer first
    looks for tensors sharing memory at ~30 µs a tensor (0.1 s for a 100-layer network's training
    state, at every epoch). Else through torch's writer."""
    on_cpu = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    if all(t.dtype in _NUMPY_DTYPES for t in on_cpu.values()):
        data: bytes = safetensors.numpy.save({k: t.numpy() for k, t in on_cpu.items()}, metadata=metadata)
    else:
        data = safetensors.torch.save(on_cpu, metadata=metadata)
    return data


_NUMPY_DTYPES = frozenset(
    {torch.float64, torch.float32, torch.float16, torch.int64, torch.int32, torch.int16, torch.int8,
     torch.uint8, torch.bool}
)  # fmt: skip


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def load_checkpoint(data: bytes, cfg: ModelConfig | None = None) -> tuple[nn.Module, ModelConfig]:
    """Rebuild the model stored in `data`, in eval mode.

    The config comes from the checkpoint's metadata unless `cfg` is given (e.g. the one recorded in
    the database), in which case the weights must fit that config.
    """
    metadata = _read_metadata(data)
    if metadata.get("format") != FORMAT:
        raise CheckpointError(
            f"not a bnlab checkpoint (format {metadata.get('format')!r}, expected {FORMAT!r})"
        )
    if cfg is None:
        cfg = _config_from_metadata(metadata)
    try:
        # On the meta device: no memory and no random init (so no draw from the global RNG), yet
        # the exact keys, shapes and dtypes to check against. An absurd config costs nothing here.
        with torch.device("meta"):
            model = make_net(cfg)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"the checkpoint's model config cannot be built: {e}") from e
    try:
        tensors: dict[str, torch.Tensor] = safetensors.torch.load(data)
    except Exception as e:  # safetensors raises its own error types (and others) for malformed data
        raise CheckpointError(f"the checkpoint's tensors cannot be read: {e}") from e
    _check_tensors(tensors, model.state_dict())
    model = model.to_empty(device="cpu")  # every parameter and buffer is then set by the state_dict
    model.load_state_dict(tensors, strict=True)
    model.eval()  # a loaded model is for inference: BN must use its running statistics
    return model, cfg


def _read_metadata(data: bytes) -> dict[str, str]:
    """Parse the safetensors header ourselves: 8 bytes little-endian length, then that much JSON."""
    if len(data) < 8:
        raise CheckpointError(f"checkpoint too short ({len(data)} bytes)")
    header_len = int.from_bytes(data[:8], "little")
    if header_len > MAX_HEADER_BYTES:
        raise CheckpointError(f"checkpoint header claims {header_len} bytes, more than {MAX_HEADER_BYTES}")
    if 8 + header_len > len(data):
        raise CheckpointError("checkpoint truncated: the header runs past the end of the data")
    try:
        header: Any = json.loads(data[8 : 8 + header_len])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint header is not valid JSON: {e}") from e
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(metadata, dict):
        raise CheckpointError("checkpoint header has no __metadata__ (not a bnlab checkpoint)")
    return metadata


def _config_from_metadata(metadata: dict[str, str]) -> ModelConfig:
    try:
        return ModelConfig.from_dict(json.loads(metadata["model_config"]))
    except (KeyError, TypeError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"checkpoint metadata has no valid model_config: {e!r}") from e


def _check_tensors(tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Same keys, shapes and dtypes as the freshly built net, and no NaN/inf anywhere."""
    missing, unexpected = sorted(expected.keys() - tensors.keys()), sorted(tensors.keys() - expected.keys())
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint keys do not match the model: missing {missing}, unexpected {unexpected}"
        )
    for name, ref in expected.items():
        t = tensors[name]
        if t.shape != ref.shape or t.dtype != ref.dtype:
            raise CheckpointError(
                f"{name}: checkpoint has {t.dtype} {tuple(t.shape)},"
                f" the model needs {ref.dtype} {tuple(ref.shape)}"
            )
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{name}: checkpoint holds NaN or infinite values")
