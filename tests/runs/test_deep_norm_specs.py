"""The normalizers that came after BN in a run spec, through the real API (SQLite, folder broker):
frn, ws, noisy_batch and example weighing are accepted and echoed normalised; nonsense is a 422 that
names the field, and nothing is stored."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.ml.config import ModelConfig, NormConfig
from service.runs.schemas import RunCreate
from service.runs.spec import model_config

DATA = {"name": "synthetic", "limit": 200}


def submit(client: TestClient, model: dict[str, Any], **train: Any) -> Any:
    return client.post("/api/v1/runs", json={"dataset": DATA, "model": model, "train": train})


@pytest.mark.parametrize(
    ("model", "echoed"),
    [
        ({"norm": {"kind": "frn"}}, {"kind": "frn", "position": "before_activation", "eps": 0.001}),
        (
            {"arch": "cnn", "channels": [8], "norm": {"kind": "frn", "eps": 1e-4}},
            {"kind": "frn", "position": "before_activation", "eps": 1e-4},
        ),
        ({"norm": {"kind": "ws"}}, {"kind": "ws", "position": "after_activation"}),
        ({"activation": "gelu", "arch": "cnn", "channels": [8], "norm": {"kind": "ws"}}, {"kind": "ws"}),
        ({"norm": {"kind": "noisy_batch"}}, {"kind": "noisy_batch", "noise_mean": 0.5, "noise_std": 1.0}),
        (
            {"norm": {"kind": "noisy_batch", "noise_mean": 0, "noise_std": 2}},
            {"kind": "noisy_batch", "noise_mean": 0, "noise_std": 2},
        ),
        ({"norm": {"example_weight": 0.05}}, {"kind": "batch", "example_weight": 0.05}),
        (
            {"norm": {"kind": "ghost", "virtual_batch_size": 8, "example_weight": 0.1}},
            {"example_weight": 0.1},
        ),
        ({"norm": {"kind": "noisy_batch", "example_weight": 0.1}}, {"example_weight": 0.1}),
    ],
    ids=[
        "frn-mlp",
        "frn-cnn",
        "ws",
        "ws-gelu-cnn",
        "noisy",
        "noisy-scale-only",
        "weighed",
        "ghost-w",
        "noisy-w",
    ],
)
def test_new_kinds_are_accepted_and_echoed_normalised(
    client: TestClient, model: dict[str, Any], echoed: dict[str, Any]
) -> None:
    response = submit(client, model)
    assert response.status_code == 202, response.text
    spec = response.json()["spec"]
    norm = spec["model"]["norm"]
    for name, value in echoed.items():
        assert norm[name] == value, (name, norm)
    assert {"noise_mean", "noise_std", "example_weight"} <= set(norm)  # every field, defaults filled
    # The echo is itself a valid spec that means the same thing, and becomes the same network config.
    again = client.post("/api/v1/runs", json=spec).json()["spec"]
    assert again == spec
    config = model_config(RunCreate.model_validate(spec))
    assert config.norm.kind == norm["kind"]
    assert config.norm.example_weight == norm["example_weight"]
    assert ModelConfig.from_dict(config.to_dict()) == config  # what a checkpoint stores rebuilds it


@pytest.mark.parametrize(
    ("model", "named"),
    [
        ({"norm": {"kind": "frn", "position": "after_activation"}}, ["frn", "position", "before_activation"]),
        ({"activation": "tanh", "norm": {"kind": "frn"}}, ["frn", "activation", "'relu'", "TLU"]),
        ({"norm": {"kind": "noisy_batch", "noise_mean": 0, "noise_std": 0}}, ["noisy_batch", "noise"]),
        ({"norm": {"kind": "noisy_batch", "noise_std": -1}}, ["noise_std"]),
        ({"norm": {"kind": "noisy_batch", "noise_mean": 11}}, ["noise_mean"]),
        ({"norm": {"kind": "noisy_batch", "noise_mean": True}}, ["noise_mean"]),
        ({"norm": {"example_weight": 1.0}}, ["example_weight"]),
        ({"norm": {"example_weight": -0.1}}, ["example_weight"]),
        ({"norm": {"kind": "layer", "example_weight": 0.1}}, ["example_weight", "'layer'"]),
        ({"norm": {"kind": "frn", "example_weight": 0.1}}, ["example_weight", "'frn'"]),
        (
            {"norm": {"example_weight": 0.1, "track_running_stats": False}},
            ["example_weight", "track_running_stats"],
        ),
        ({"norm": {"kind": "spectral"}}, ["kind"]),
    ],
)
def test_nonsense_is_422_naming_the_field_and_nothing_is_stored(
    client: TestClient, model: dict[str, Any], named: list[str]
) -> None:
    response = submit(client, model)
    assert response.status_code == 422, response.text
    for name in named:
        assert name in response.text, (name, response.text)
    assert client.get("/api/v1/runs").json()["total"] == 0


def test_sync_stays_batch_only(client: TestClient) -> None:
    response = submit(client, {"norm": {"kind": "noisy_batch", "sync": True}}, processes=2)
    assert response.status_code == 422
    assert "'noisy_batch'" in response.text


def test_old_stored_configs_load_with_the_new_fields_defaulted() -> None:
    stored = ModelConfig().to_dict()
    for name in ("noise_mean", "noise_std", "example_weight"):
        del stored["norm"][name]
    assert ModelConfig.from_dict(stored).norm == NormConfig()
