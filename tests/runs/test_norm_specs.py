"""Normaliser, architecture and optimiser fields of a run spec through the real API (SQLite, folder
broker): bad values are a 422 naming the field, nothing is stored or enqueued, and the answer echoes
the normalised spec: what will run, in PyTorch's names."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

DATA = {"name": "synthetic", "limit": 200}


def submit(client: TestClient, model: dict[str, Any], **top: Any) -> Any:
    return client.post("/api/v1/runs", json={"dataset": DATA, "model": model, **top})


def test_keras_names_are_converted_exactly_and_echoed_in_pytorchs(client: TestClient) -> None:
    norm = {"keras_momentum": 0.99, "epsilon": 0.001, "center": True, "scale": False}
    response = submit(client, {"norm": norm}, compat="keras")
    assert response.status_code == 202, response.text
    spec = response.json()["spec"]
    echoed = spec["model"]["norm"]
    assert echoed["momentum"] == 0.01  # 1 − 0.99 in decimal, not 0.010000000000000009
    assert echoed["eps"] == 0.001
    assert (echoed["keras_momentum"], echoed["epsilon"]) == (None, None)
    assert (echoed["affine"], echoed["center"], echoed["scale"]) == (True, True, False)
    assert spec["compat"] == "keras"
    assert spec["train"]["adam_eps"] == 1e-7
    # The echo is itself a valid spec that means the same thing.
    again = client.post("/api/v1/runs", json=spec).json()["spec"]
    assert again == spec


def test_defaults_echo_every_new_field(client: TestClient) -> None:
    spec = client.post("/api/v1/runs", json={"dataset": DATA}).json()["spec"]
    assert spec["compat"] == "pytorch"
    assert spec["train"]["adam_eps"] == 1e-8
    assert spec["train"]["schedule"] == {"kind": "none", "step_size": 10, "gamma": 0.1}
    assert (spec["train"]["momentum"], spec["train"]["weight_decay"]) == (0.9, 0.0)
    model = spec["model"]
    assert (model["arch"], model["channels"], model["dropout"], model["init_scale"]) == (
        "mlp",
        [32, 64],
        0.0,
        1.0,
    )
    assert model["norm"]["kind"] == "batch"
    assert (model["norm"]["eps"], model["norm"]["momentum"]) == (0.001, 0.01)
    assert (model["norm"]["affine"], model["norm"]["center"], model["norm"]["scale"]) == (True, None, None)


@pytest.mark.parametrize(
    ("model", "train", "named"),
    [
        ({"norm": {"momentum": 0.2, "keras_momentum": 0.9}}, {}, ["momentum", "keras_momentum"]),
        ({"norm": {"eps": 1e-5, "epsilon": 1e-3}}, {}, ["eps", "epsilon"]),
        ({"norm": {"affine": False, "scale": True}}, {}, ["affine", "scale"]),
        ({"hidden": [100], "norm": {"kind": "group", "num_groups": 32}}, {}, ["num_groups"]),
        ({"arch": "cnn", "channels": [24], "norm": {"kind": "group", "num_groups": 16}}, {}, ["num_groups"]),
        ({"norm": {"kind": "ghost", "virtual_batch_size": 12}}, {"batch_size": 32}, ["virtual_batch_size"]),
        ({"norm": {"kind": "instance"}}, {}, ["instance", "cnn"]),
        ({"arch": "cnn", "channels": [8] * 5, "norm": {"kind": "instance"}}, {}, ["feature maps"]),
        (
            {"norm": {"kind": "batch_renorm", "renorm_warmup_steps": 50, "renorm_dmax_steps": 10}},
            {},
            ["renorm"],
        ),
        ({"norm": {"kind": "batch_renorm", "track_running_stats": False}}, {}, ["track_running_stats"]),
        ({"norm": {"kind": "batch_renorm", "rmax": 0.5}}, {}, ["rmax"]),
        ({"norm": {"kind": "whitening"}}, {}, ["kind"]),
        ({"dropout": 0.95}, {}, ["dropout"]),
        ({"dropout_position": "inside"}, {}, ["dropout_position"]),
        ({"init_scale": 0}, {}, ["init_scale"]),
        ({"arch": "densenet"}, {}, ["arch"]),
        ({"arch": "cnn", "channels": [0]}, {}, ["channels"]),
        ({"activation": "swish"}, {}, ["activation"]),
        ({}, {"schedule": {"kind": "exponential"}}, ["schedule"]),
        ({}, {"schedule": {"kind": "step", "step_size": 0}}, ["step_size"]),
        ({}, {"adam_eps": -1e-8}, ["adam_eps"]),
        ({}, {"momentum": 1.0}, ["momentum"]),
        ({}, {"weight_decay": -0.1}, ["weight_decay"]),
        ({"norm": {"keras_momentum": True}}, {}, ["keras_momentum"]),
        ({"norm": {"sync": True}}, {}, ["model.norm.sync", "train.processes >= 2"]),
        ({"norm": {"kind": "layer", "sync": True}}, {"processes": 2}, ["model.norm.sync", "'layer'"]),
        ({"norm": {"sync": 1}}, {"processes": 2}, ["sync"]),
        ({}, {"processes": 5}, ["processes"]),
        ({}, {"processes": 2, "batch_size": 3}, ["batch_size 3", "fewer than 2 samples per process"]),
    ],
)
def test_bad_fields_are_422_naming_the_field_and_nothing_is_stored(
    client: TestClient, model: dict[str, Any], train: dict[str, Any], named: list[str]
) -> None:
    response = client.post("/api/v1/runs", json={"dataset": DATA, "model": model, "train": train})
    assert response.status_code == 422, response.text
    text = response.text
    for name in named:
        assert name in text, (name, text)
    assert client.get("/api/v1/runs").json()["total"] == 0


def test_synced_batch_norm_over_two_processes_is_accepted_and_echoed(client: TestClient) -> None:
    response = submit(client, {"norm": {"sync": True}}, train={"processes": 2, "batch_size": 4})
    assert response.status_code == 202, response.text
    spec = response.json()["spec"]
    assert (spec["model"]["norm"]["sync"], spec["train"]["processes"]) == (True, 2)


@pytest.mark.parametrize("arch", [{}, {"arch": "cnn", "channels": [8]}])
def test_batch_norm_without_running_statistics_is_accepted_and_priced(
    client: TestClient, arch: dict[str, Any]
) -> None:
    # Its time limit counts the network's operations on a forward pass in eval mode, where this BN
    # normalises with the batch's own statistics: a pass of one sample raised, and the POST was a 500.
    model = arch | {"norm": {"kind": "batch", "track_running_stats": False}}
    response = submit(client, model)
    assert response.status_code == 202, response.text
    assert response.json()["spec"]["model"]["norm"]["track_running_stats"] is False
    grid = {
        "name": "no-running-stats",
        "base": {"dataset": DATA, "model": model},
        "grid": {"train.lr": [0.1, 0.01]},
    }
    assert client.post("/api/v1/experiments", json=grid).status_code == 202


def test_unknown_compat_is_422(client: TestClient) -> None:
    response = client.post("/api/v1/runs", json={"dataset": DATA, "compat": "jax"})
    assert response.status_code == 422
    assert "compat" in response.text


def test_a_cnn_on_a_vector_dataset_is_422(client: TestClient) -> None:
    response = client.post("/api/v1/runs", json={"dataset": {"name": "mnist1d"}, "model": {"arch": "cnn"}})
    assert response.status_code == 422, response.text
    assert "cnn" in response.text
    assert client.get("/api/v1/runs").json()["total"] == 0


@pytest.mark.parametrize(
    "model",
    [
        {"arch": "cnn", "channels": [8, 16], "norm": {"kind": kind, "num_groups": 4}}
        for kind in ("batch", "layer", "group", "instance", "batch_renorm", "ghost", "weight", "batch_layer")
    ],
    ids=lambda m: m["norm"]["kind"],
)
def test_every_cnn_kind_is_accepted(client: TestClient, model: dict[str, Any]) -> None:
    response = submit(client, model)
    assert response.status_code == 202, response.text
    assert response.json()["spec"]["model"]["norm"]["kind"] == model["norm"]["kind"]


@pytest.mark.parametrize(
    ("model", "position"),
    [
        ({"arch": "mlp"}, "after_activation"),  # the article's Keras code: Dense(relu), then BN
        ({"arch": "cnn", "channels": [8]}, "before_activation"),  # the Conv–Norm–Act block
        ({"arch": "cnn", "channels": [8], "norm": {"position": "after_activation"}}, "after_activation"),
    ],
)
def test_the_norm_position_defaults_by_architecture_and_is_echoed(
    client: TestClient, model: dict[str, Any], position: str
) -> None:
    response = submit(client, model)
    assert response.status_code == 202, response.text
    assert response.json()["spec"]["model"]["norm"]["position"] == position
