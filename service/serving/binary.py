"""Triton's binary tensor data extension for /v2 inference (`binary_tensor_data`).

A request may carry its input tensors as raw bytes after the JSON header: the header's length is in
`Inference-Header-Content-Length`, and each binary input says its size in
`parameters.binary_data_size` (the bytes follow in the order of the inputs). Outputs come back as
raw bytes when the request asks, per output (`parameters.binary_data: true`) or for all of them
(`parameters.binary_data_output: true`, which a per-output `binary_data` overrides); the answer
then has the same layout. Bytes are little-endian, row-major, without padding.

Everything here checks sizes before it reads a byte: an inconsistent request is a BinaryError
(a 400 with the message), never a short read or a 500.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import orjson
from fastapi import Response

from service.serving.inference import V2_DATATYPES
from service.serving.schemas import V2InferInput, V2InferRequest

HEADER_LENGTH = "Inference-Header-Content-Length"

# The Open Inference Protocol's datatypes as bytes travel: little-endian, as Triton sends them.
WIRE_DTYPES: dict[str, np.dtype[Any]] = {
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "UINT8": np.dtype("u1"),
    "INT64": np.dtype("<i8"),
}
# The input datatypes accepted as binary: exactly those the JSON route accepts (inference.V2_DATATYPES).
INPUT_DTYPES: dict[str, np.dtype[Any]] = {name: WIRE_DTYPES[name] for name in V2_DATATYPES}
# The outputs' encodings: probabilities and predictions.
OUTPUT_DTYPES: dict[str, np.dtype[Any]] = {name: WIRE_DTYPES[name] for name in ("FP32", "INT64")}


class BinaryError(ValueError):
    """The binary parts of a request do not add up; the message says how."""


def header_length(value: str | None, body_size: int) -> int | None:
    """The JSON header's length from `Inference-Header-Content-Length`; None when the header is absent."""
    if value is None:
        return None
    text = value.strip()
    if not text.isascii() or not text.isdigit():
        raise BinaryError(f"{HEADER_LENGTH} must be a whole number of bytes; got {value!r}")
    # No body has 19 digits of bytes, and int() refuses thousands of digits: compare lengths first.
    if len(text) > 18 or int(text) > body_size:
        shown = text if len(text) <= 18 else text[:18] + "…"
        raise BinaryError(f"{HEADER_LENGTH} is {shown}, but the body has only {body_size} bytes")
    return int(text)


def _size_parameter(tensor: V2InferInput, where: str) -> int | None:
    size = (tensor.parameters or {}).get("binary_data_size")
    if size is None:
        return None
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise BinaryError(
            f"{where}.parameters.binary_data_size must be a whole number of bytes; got {size!r}"
        )
    return size


def input_bytes(request: V2InferRequest, tail: memoryview) -> list[memoryview | None]:
    """Each input's binary data (None for a JSON input), cut from the bytes after the JSON header."""
    sizes = [_size_parameter(tensor, f"inputs.{i}") for i, tensor in enumerate(request.inputs)]
    for i, (tensor, size) in enumerate(zip(request.inputs, sizes, strict=True)):
        if size is not None and tensor.data is not None:
            raise BinaryError(f"inputs.{i} has both data and parameters.binary_data_size; send one of them")
        if size is None and tensor.data is None:
            raise BinaryError(
                f"inputs.{i}.data: Field required (or parameters.binary_data_size for binary data)"
            )
    declared = sum(size or 0 for size in sizes)
    if declared != len(tail):
        raise BinaryError(
            f"the inputs' binary_data_size add up to {declared} bytes, but {len(tail)} bytes follow the "
            f"JSON header (send {HEADER_LENGTH} with the JSON header's length)"
        )
    parts: list[memoryview | None] = []
    offset = 0
    for size in sizes:
        parts.append(None if size is None else tail[offset : offset + size])
        offset += size or 0
    return parts


def decode(datatype: str, shape: Sequence[int], raw: memoryview) -> np.ndarray:
    """A binary input as a flat array of its datatype, once its size fits its shape."""
    dtype = INPUT_DTYPES.get(datatype)
    if dtype is None:
        raise BinaryError(f"binary data is supported for {', '.join(INPUT_DTYPES)} inputs; got {datatype}")
    needed = math.prod(shape) * dtype.itemsize
    if len(raw) != needed:
        raise BinaryError(
            f"binary_data_size is {len(raw)} bytes, but shape {list(shape)} of {datatype} needs {needed}"
        )
    return np.frombuffer(raw, dtype=dtype)


def _flag(parameters: dict[str, Any] | None, name: str, where: str) -> bool | None:
    value = (parameters or {}).get(name)
    if value is not None and not isinstance(value, bool):
        raise BinaryError(f"{where}parameters.{name} must be true or false; got {value!r}")
    return value


def binary_outputs(request: V2InferRequest, names: Sequence[str]) -> frozenset[str]:
    """The outputs to answer as binary data: `binary_data` per output, else `binary_data_output`."""
    default = _flag(request.parameters, "binary_data_output", "") or False
    if not request.outputs:
        return frozenset(names) if default else frozenset()
    chosen = set()
    for i, output in enumerate(request.outputs):
        if (output.parameters or {}).get("classification") is not None:
            raise BinaryError(f"outputs.{i}: classification outputs are not supported; ask for the tensor")
        flag = _flag(output.parameters, "binary_data", f"outputs.{i}.")
        wanted = default if flag is None else flag
        if wanted:
            chosen.add(output.name)
    return frozenset(chosen)


def response(header: dict[str, Any], tensors: dict[str, np.ndarray]) -> Response:
    """An inference answer with the `tensors` named in it (in the order of `header["outputs"]`) as raw
    bytes after the JSON header; every other output keeps its `data`."""
    chunks: list[bytes] = []
    for output in header["outputs"]:
        array = tensors.get(output["name"])
        if array is not None:
            raw = np.ascontiguousarray(array, dtype=OUTPUT_DTYPES[output["datatype"]]).tobytes()
            output["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
    json_header = orjson.dumps(header)
    return Response(
        content=b"".join([json_header, *chunks]),
        media_type="application/octet-stream",
        headers={HEADER_LENGTH: str(len(json_header))},
    )
