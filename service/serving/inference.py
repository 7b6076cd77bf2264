"""Request inputs → model inputs: shapes, datatypes, finiteness and range checked, one message per fault.

Two encodings arrive here: the predict route's `{"inputs": [...]}` (pixel values in [0, 1], nested
per sample) and the Open Inference Protocol's tensors (`datatype`, `shape` with the batch first, and
`data` flat or nested in row-major order). Both end as float32 [N, *input_shape]: in [0, 1] for a
model trained on pixels, any finite value for one trained on float features (ModelConfig.input_kind).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from service.ml.config import ModelConfig

MAX_SAMPLES = 1024  # per request; the predict schema and the V2 route both hold to it
FLOAT32_MAX = float(np.finfo(np.float32).max)

# Open Inference Protocol datatypes we accept, and how a value maps to a pixel in [0, 1].
V2_DATATYPES = {"FP32": 1.0, "FP64": 1.0, "UINT8": 255.0}


class InputError(ValueError):
    """The request's inputs do not fit the model; the message says what was expected."""


def accepted_sample_shapes(config: ModelConfig) -> list[tuple[int, ...]]:
    """Per-sample shapes accepted for the model: flat, as configured, and without unit dims."""
    sample_shape = tuple(config.input_shape)
    shapes = {(math.prod(sample_shape),), sample_shape, tuple(d for d in sample_shape if d != 1)}
    return sorted(shapes, key=len)


def _expected(config: ModelConfig) -> str:
    return " or ".join("N×" + "×".join(map(str, shape)) for shape in accepted_sample_shapes(config))


def _to_model_input(array: np.ndarray, config: ModelConfig) -> torch.Tensor:
    """Check a float array (pixels in [0, 1]; features any finite value, as the model was trained
    on them) and reshape it to [N, *input_shape] float32."""
    if not np.isfinite(array).all():
        raise InputError("inputs must be finite numbers (no NaN or infinity)")
    if config.input_kind == "features":
        if np.abs(array).max(initial=0.0) > FLOAT32_MAX:
            raise InputError("inputs must fit in float32")
    elif array.size and (array.min() < 0.0 or array.max() > 1.0):
        raise InputError("inputs must be pixel values in [0, 1] (divide 0–255 pixels by 255)")
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    return tensor.reshape(array.shape[0], *config.input_shape)


def _contains_boolean(values: list[Any] | np.ndarray) -> bool:
    # numpy would read JSON true/false as 1.0/0.0; a tensor of numbers takes numbers only. One set of
    # types per list, not a Python step per value: 784 values cost ~10 µs instead of ~60. Iterative,
    # not recursive: nesting depth is the client's to choose. Binary tensor data (an array) has none.
    if isinstance(values, np.ndarray):
        return False
    pending: list[list[Any]] = [values]
    while pending:
        current = pending.pop()
        types = set(map(type, current))
        if bool in types:
            return True
        if list in types:
            pending.extend(value for value in current if type(value) is list)
    return False


def could_hold_booleans(body: bytes) -> bool:
    """False when a JSON body cannot hold true or false anywhere: a scan of the bytes (a few µs for
    a 784-value request) spares the per-list check of every value."""
    return b"true" in body or b"false" in body


def _numbers(values: list[Any] | np.ndarray, message: str, *, booleans_possible: bool = True) -> np.ndarray:
    if booleans_possible and _contains_boolean(values):
        raise InputError(f"{message}; true/false are not numbers")
    try:
        return np.asarray(values, dtype=np.float64)
    except (ValueError, TypeError) as exc:
        raise InputError(message) from exc


def inputs_to_tensor(
    inputs: list[Any], config: ModelConfig, *, booleans_possible: bool = True
) -> torch.Tensor:
    """The predict route's nested `inputs`: N samples of one accepted shape, values in [0, 1].
    `booleans_possible=False` (could_hold_booleans of the body) skips the check for true/false."""
    message = f"inputs must be a rectangular array of numbers of shape {_expected(config)}"
    array = _numbers(inputs, message, booleans_possible=booleans_possible)
    if array.ndim < 2 or tuple(array.shape[1:]) not in accepted_sample_shapes(config):
        raise InputError(f"inputs must have shape {_expected(config)}; got {'×'.join(map(str, array.shape))}")
    return _to_model_input(array, config)


def v2_tensor_to_input(
    datatype: str,
    shape: list[int],
    data: list[Any] | np.ndarray,
    config: ModelConfig,
    *,
    booleans_possible: bool = True,
) -> torch.Tensor:
    """An Open Inference Protocol input tensor → model input. `data` is flat or nested row-major (or,
    from binary tensor data, a flat array); `booleans_possible` as for inputs_to_tensor."""
    if datatype not in V2_DATATYPES:
        raise InputError(f"datatype {datatype} is not supported; use one of {', '.join(V2_DATATYPES)}")
    if len(shape) < 2 or tuple(shape[1:]) not in accepted_sample_shapes(config):
        samples = _expected(config).replace("N×", "")
        raise InputError(f"shape must be [N, ...] with a sample shape of {samples}; got {shape}")
    if not 1 <= shape[0] <= MAX_SAMPLES:
        raise InputError(f"the batch dimension must be between 1 and {MAX_SAMPLES}; got {shape[0]}")
    array = _numbers(
        data,
        "data must be numbers, flat or nested in row-major order (not ragged)",
        booleans_possible=booleans_possible,
    )
    if array.ndim != 1 and list(array.shape) != shape:
        raise InputError(
            f"nested data has shape {list(array.shape)}, which is not the declared shape {shape}"
        )
    if array.size != math.prod(shape):
        raise InputError(f"data has {array.size} values; shape {shape} needs {math.prod(shape)}")
    array = array.reshape(shape)
    if datatype == "UINT8":
        if not np.isfinite(array).all() or (array != np.round(array)).any():
            raise InputError("UINT8 data must be integers")
        if array.min() < 0 or array.max() > 255:
            raise InputError("UINT8 data must be in [0, 255]")
    # UINT8 are pixels 0..255 for an image model, plain values for a features model.
    scale = V2_DATATYPES[datatype] if config.input_kind == "pixels" else 1.0
    return _to_model_input(array / scale, config)
