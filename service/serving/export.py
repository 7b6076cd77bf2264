"""ONNX export of a served model (eval mode; fused unless asked otherwise).

torch's exporter (torch.export + onnxscript) traces the module with a symbolic batch dimension, so
the file accepts any batch size. The graph's input is `input` [batch, *input_shape] float32 in
[0, 1], its output `logits` [batch, classes]; softmax them for the probabilities the API returns.
Exports take about a second, so the last few are kept per (run, version, sha256, fused).
"""

from __future__ import annotations

import copy
import logging
import threading
import warnings
from collections import OrderedDict

import torch
from torch import nn

ONNX_CACHE_SIZE = 8
_lock = threading.Lock()  # the exporter is not documented as thread-safe: one export at a time
_cache: OrderedDict[tuple[str, int, str, bool], bytes] = OrderedDict()

# Without torchvision installed the exporter logs a warning per torchvision op it cannot register.
logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)


def export_onnx(model: nn.Module, input_shape: tuple[int, ...]) -> bytes:
    """ONNX bytes of `model` (which must be in eval mode) with a dynamic batch dimension."""
    if model.training:
        raise ValueError("export needs a model in eval mode")
    module = copy.deepcopy(model)
    example = (torch.zeros(2, *input_shape),)
    with warnings.catch_warnings():
        # torch.export's internals emit FutureWarnings about their own pytree API; nothing of ours.
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        program = torch.onnx.export(
            module,
            example,
            dynamo=True,
            input_names=["input"],
            output_names=["logits"],
            dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1_000_000)},),
            verbose=False,
        )
    assert program is not None
    data: bytes = program.model_proto.SerializeToString()
    return data


def cached_export(key: tuple[str, int, str, bool], model: nn.Module, input_shape: tuple[int, ...]) -> bytes:
    with _lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
        data = export_onnx(model, input_shape)
        _cache[key] = data
        while len(_cache) > ONNX_CACHE_SIZE:
            _cache.popitem(last=False)
        return data
