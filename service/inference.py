"""Serving trained runs: load a run's weights once per process, validate inputs, predict in eval mode."""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from typing import Any

import numpy as np
import torch
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.ml import checkpoints, training
from service.ml.config import ModelConfig
from service.models import ModelArtifact

MODEL_CACHE_SIZE = 16


class InputError(ValueError):
    """The request's inputs do not fit the model; the message says what was expected."""


class ModelCache:
    """A small LRU of loaded models keyed by (run, version, sha256), so new weights are never stale."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._models: OrderedDict[tuple[str, int, str], tuple[torch.nn.Module, ModelConfig]] = OrderedDict()
        self._lock = threading.Lock()

    def get(
        self, *, session: Session, run_id: str, version: int = 1
    ) -> tuple[torch.nn.Module, ModelConfig] | None:
        sha = session.scalar(
            select(ModelArtifact.sha256).where(
                ModelArtifact.run_id == run_id, ModelArtifact.version == version
            )
        )
        if sha is None:
            return None
        key = (run_id, version, sha)
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
        artifact = session.get(ModelArtifact, (run_id, version))
        if artifact is None:
            return None
        loaded = checkpoints.load_checkpoint(artifact.weights, ModelConfig.from_dict(artifact.model_config))
        with self._lock:
            self._models[key] = loaded
            while len(self._models) > self._capacity:
                self._models.popitem(last=False)
        return loaded


model_cache = ModelCache(MODEL_CACHE_SIZE)


def inputs_to_tensor(inputs: list[Any], config: ModelConfig) -> torch.Tensor:
    """Check shape, finiteness and range; return float32 [N, *input_shape]."""
    sample_shape = tuple(config.input_shape)
    flat = math.prod(sample_shape)
    accepted = {(flat,), sample_shape, tuple(d for d in sample_shape if d != 1)}
    expected = " or ".join("N×" + "×".join(map(str, shape)) for shape in sorted(accepted, key=len))
    try:
        array = np.asarray(inputs, dtype=np.float32)
    except (ValueError, TypeError) as exc:
        raise InputError(f"inputs must be a rectangular array of numbers of shape {expected}") from exc
    if array.ndim < 2 or tuple(array.shape[1:]) not in accepted:
        raise InputError(f"inputs must have shape {expected}; got {'×'.join(map(str, array.shape))}")
    if not np.isfinite(array).all():
        raise InputError("inputs must be finite numbers (no NaN or infinity)")
    if array.min() < 0.0 or array.max() > 1.0:
        raise InputError("inputs must be pixel values in [0, 1] (divide 0–255 pixels by 255)")
    return torch.from_numpy(array).reshape(len(array), *sample_shape)


def predict(model: torch.nn.Module, inputs: torch.Tensor) -> tuple[list[int], list[list[float]]]:
    probabilities = training.predict_proba(model, inputs)
    return probabilities.argmax(dim=1).tolist(), probabilities.tolist()
