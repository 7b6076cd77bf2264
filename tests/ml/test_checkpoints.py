"""Checkpoint round trips, and every kind of bad input refused with CheckpointError."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

import pytest
import safetensors.torch
import torch
from torch import nn

from service.ml.checkpoints import (
    FORMAT,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
    sha256_hex,
    tensor_bytes,
)
from service.ml.config import ModelConfig, NormConfig
from service.ml.nets import make_net

CFG = ModelConfig(hidden=(32, 16), activation="tanh", norm=NormConfig(position="before_activation"))


@pytest.fixture(scope="module")
def model() -> nn.Module:
    """A BN net with moved running buffers, as after training."""
    torch.manual_seed(0)
    net = make_net(CFG)
    net.train()
    for _ in range(3):
        net(torch.rand(16, 1, 28, 28))
    return net.eval()


def state_with(model: nn.Module, **changes: torch.Tensor) -> dict[str, torch.Tensor]:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state.update(changes)
    return state


def raw(state: dict[str, torch.Tensor], cfg: ModelConfig = CFG, **metadata: str) -> bytes:
    meta = {"format": FORMAT, "model_config": json.dumps(cfg.to_dict()), **metadata}
    data: bytes = safetensors.torch.save(state, metadata=meta)
    return data


def test_round_trip_gives_identical_outputs(model: nn.Module) -> None:
    data = save_checkpoint(model, CFG)
    loaded, cfg = load_checkpoint(data)
    assert cfg == CFG
    assert not loaded.training
    x = torch.rand(8, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_loading_with_a_given_config(model: nn.Module) -> None:
    data = save_checkpoint(model, CFG)
    assert load_checkpoint(data, CFG)[1] is CFG
    with pytest.raises(CheckpointError, match=r"fc1\.weight.*\(32, 784\).*\(128, 784\)"):
        load_checkpoint(data, dataclasses.replace(CFG, hidden=(128, 16)))


def test_sha256_hex() -> None:
    assert sha256_hex(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_loading_leaves_the_global_rng_alone(model: nn.Module) -> None:
    data = save_checkpoint(model, CFG)
    torch.manual_seed(5)
    expected = torch.rand(2)
    torch.manual_seed(5)
    load_checkpoint(data)
    assert torch.equal(torch.rand(2), expected)


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        (lambda d: d[:4], "too short"),
        (lambda d: d[: len(d) // 2], "tensors cannot be read"),
        (lambda d: d[:20], "truncated"),
        (lambda d: (2**62).to_bytes(8, "little") + d[8:], "header claims"),
        (lambda d: (7).to_bytes(8, "little") + b"not json" + d[15:], "not valid JSON"),
    ],
    ids=["tiny", "half", "header-cut", "huge-header-length", "bad-json"],
)
def test_corrupt_bytes(model: nn.Module, mangle: Callable[[bytes], bytes], message: str) -> None:
    data = save_checkpoint(model, CFG)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(mangle(data))


def test_wrong_key(model: nn.Module) -> None:
    state = state_with(model)
    state["fc9.weight"] = state.pop("fc1.weight")
    with pytest.raises(CheckpointError, match=r"missing \['fc1.weight'\], unexpected \['fc9.weight'\]"):
        load_checkpoint(raw(state))


def test_wrong_shape_and_dtype(model: nn.Module) -> None:
    with pytest.raises(CheckpointError, match=r"out\.bias.*\(9,\)"):
        load_checkpoint(raw(state_with(model, **{"out.bias": torch.zeros(9)})))
    with pytest.raises(CheckpointError, match=r"out\.bias.*float64"):
        load_checkpoint(raw(state_with(model, **{"out.bias": torch.zeros(10, dtype=torch.float64)})))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weight(model: nn.Module, bad: float) -> None:
    weight = model.state_dict()["fc2.weight"].clone()
    weight[3, 4] = bad
    with pytest.raises(CheckpointError, match=r"fc2\.weight.*NaN or infinite"):
        load_checkpoint(raw(state_with(model, **{"fc2.weight": weight})))


def test_metadata_problems(model: nn.Module) -> None:
    state = state_with(model)
    with pytest.raises(CheckpointError, match="not a bnlab checkpoint"):
        load_checkpoint(raw(state, format="other-v9"))
    with pytest.raises(CheckpointError, match="__metadata__"):
        load_checkpoint(safetensors.torch.save(state))
    with pytest.raises(CheckpointError, match="model_config"):
        load_checkpoint(raw(state, model_config="{"))
    bad_cfg = json.dumps({**CFG.to_dict(), "activation": "swish"})
    with pytest.raises(CheckpointError, match="cannot be built"):
        load_checkpoint(raw(state, model_config=bad_cfg))


def _with_header(data: bytes, edit: Callable[[dict[str, Any]], None]) -> bytes:
    """Rewrite a safetensors header (keeping the tensor bytes) to forge a malformed file."""
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    edit(header)
    encoded = json.dumps(header).encode()
    return len(encoded).to_bytes(8, "little") + encoded + data[8 + length :]


def _overlap(header: dict[str, Any]) -> None:
    names = sorted(k for k in header if k != "__metadata__")
    header[names[1]]["data_offsets"] = header[names[0]]["data_offsets"]


def _past_the_end(header: dict[str, Any]) -> None:
    name = next(k for k in header if k != "__metadata__")
    start, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [start, end + 10**9]


@pytest.mark.parametrize(
    "edit", [_overlap, _past_the_end], ids=["overlapping-offsets", "offsets-past-the-end"]
)
def test_forged_offsets_are_refused(model: nn.Module, edit: Callable[[dict[str, Any]], None]) -> None:
    with pytest.raises(CheckpointError):
        load_checkpoint(_with_header(save_checkpoint(model, CFG), edit))


def test_tensor_bytes_are_torch_writers_bytes_for_every_dtype() -> None:
    """Through numpy where it can, through torch's writer for the rest: the same file either way."""
    tensors = {
        "weight": torch.randn(3, 4),
        "steps": torch.tensor(7),
        "mask": torch.tensor([True, False]),
        "half": torch.randn(2, dtype=torch.float16),
        "transposed": torch.randn(4, 3).t(),  # not contiguous: written as its contiguous copy
    }
    metadata = {"format": "x"}
    expected = safetensors.torch.save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)
    assert tensor_bytes(tensors, metadata) == expected
    brain = tensors | {"bf16": torch.randn(2, dtype=torch.bfloat16)}  # numpy has no bfloat16
    expected = safetensors.torch.save({k: v.contiguous() for k, v in brain.items()}, metadata=metadata)
    assert tensor_bytes(brain, metadata) == expected
