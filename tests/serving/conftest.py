"""Trained runs stored as a worker would store them, served by the in-process API.

Models are trained for real (synthetic data, a few hundred samples, two epochs) once per
configuration and test session, then written with the service's own data functions.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from service.db import session_scope
from service.ml import checkpoints, datasets, training
from service.models import RunStatus
from service.runs import repository as run_repo
from service.runs.schemas import RunCreate
from service.runs.spec import model_config, train_config

BN_SPEC: dict[str, Any] = {
    "name": "bn",
    "dataset": {"name": "synthetic", "limit": 600},
    "model": {"hidden": [32], "norm": {"kind": "batch"}},
    "train": {"epochs": 2, "batch_size": 16},
}
NO_BN_SPEC: dict[str, Any] = BN_SPEC | {"name": "no-bn", "model": {"hidden": [32], "norm": {"kind": "none"}}}

StoreRun = Callable[[dict[str, Any]], str]


@functools.lru_cache(maxsize=16)
def _trained_weights(spec_json: str) -> tuple[bytes, dict[str, Any]]:
    spec = RunCreate.model_validate_json(spec_json)
    full = datasets.load_dataset(spec.dataset.name, search_dirs=[], split="train", limit=spec.dataset.limit)
    train_set, val_set = datasets.train_val_split(full, spec.dataset.val_split)
    config = model_config(spec)
    result = training.train(config, train_config(spec), train_set, val_set)
    return checkpoints.save_checkpoint(result.model, config), config.to_dict()


def store_trained_run(spec_fields: dict[str, Any], *, status: RunStatus = RunStatus.succeeded) -> str:
    spec = RunCreate.model_validate(spec_fields)
    with session_scope() as session:
        run = run_repo.create_run(session=session, spec=spec)
        run.status = status.value
        if status == RunStatus.succeeded:
            weights, config = _trained_weights(spec.model_dump_json())
            run_repo.save_artifact(
                session=session,
                run_id=run.id,
                weights=weights,
                model_config=config,
                sha256=checkpoints.sha256_hex(weights),
            )
        return run.id


@pytest.fixture
def bn_run(client: TestClient) -> str:
    return store_trained_run(BN_SPEC)


@pytest.fixture
def no_bn_run(client: TestClient) -> str:
    return store_trained_run(NO_BN_SPEC)


def stored_model(run_id: str, version: int = 1) -> torch.nn.Module:
    """The run's stored weights, rebuilt straight from the database: the oracle for served answers."""
    with session_scope() as session:
        artifact = run_repo.get_artifact(session=session, run_id=run_id, version=version)
        assert artifact is not None
        model, _ = checkpoints.load_checkpoint(artifact.weights)
    return model


def oracle_probabilities(run_id: str, inputs: np.ndarray, version: int = 1) -> np.ndarray:
    model = stored_model(run_id, version).eval()
    with torch.inference_mode():
        logits = model(torch.as_tensor(inputs, dtype=torch.float32).reshape(len(inputs), 1, 28, 28))
    result: np.ndarray = logits.softmax(dim=1).numpy()
    return result
