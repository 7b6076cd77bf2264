"""The training switches of a run spec (docs/training-switches.md) through the real API (SQLite,
folder broker): each is echoed normalised, a bad value is a 422 naming it, it reaches TrainConfig,
and a stored spec from before the switch still loads with its default."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.ml.config import TrainConfig
from service.runs.schemas import RunCreate
from service.runs.spec import train_config

DATA = {"name": "synthetic", "limit": 200}


def post(client: TestClient, train: dict[str, Any], model: dict[str, Any] | None = None) -> Any:
    return client.post("/api/v1/runs", json={"dataset": DATA, "model": model or {}, "train": train})


def test_switches_default_off_in_the_echo_and_the_config(client: TestClient) -> None:
    spec = client.post("/api/v1/runs", json={"dataset": DATA}).json()["spec"]
    assert (spec["train"]["agc"], spec["train"]["frozen_bn_epochs"], spec["train"]["trainable"]) == (
        None,
        0,
        "all",
    )
    tcfg = train_config(RunCreate.model_validate(spec))
    assert (tcfg.agc, tcfg.frozen_bn_epochs, tcfg.trainable) == (None, 0, "all")
    assert (spec["train"]["batch_order"], spec["train"]["batch_classes"]) == ("shuffled", None)
    assert tcfg.batch_order == "shuffled"


def test_agc_is_echoed_and_reaches_the_train_config(client: TestClient) -> None:
    response = post(client, {"agc": 0.01})
    assert response.status_code == 202, response.text
    spec = response.json()["spec"]
    assert spec["train"]["agc"] == 0.01
    assert train_config(RunCreate.model_validate(spec)).agc == 0.01


@pytest.mark.parametrize(
    ("train", "model", "named"),
    [
        ({"agc": 0}, {}, ["agc"]),
        ({"agc": -0.1}, {}, ["agc"]),
        ({"agc": True}, {}, ["agc"]),
        ({"agc": 1000}, {}, ["agc"]),
    ],
)
def test_bad_switches_are_422_naming_the_field_and_nothing_is_stored(
    client: TestClient, train: dict[str, Any], model: dict[str, Any], named: list[str]
) -> None:
    response = post(client, train, model)
    assert response.status_code == 422, response.text
    for name in named:
        assert name in response.text, (name, response.text)
    assert client.get("/api/v1/runs").json()["total"] == 0


def test_stored_specs_and_configs_from_before_the_switches_still_load() -> None:
    old_spec = {"dataset": DATA, "train": {"epochs": 3, "batch_size": 32, "adam_eps": 1e-8}}
    tcfg = train_config(RunCreate.model_validate(old_spec))
    assert tcfg == TrainConfig(epochs=3, batch_size=32)
    plain = asdict(TrainConfig())
    for switch in ("agc", "frozen_bn_epochs", "trainable", "batch_order", "batch_classes"):
        del plain[switch]
    assert TrainConfig(**plain) == TrainConfig()  # a data-parallel job file written before the switches


def test_frozen_bn_epochs_are_echoed_and_reach_the_train_config(client: TestClient) -> None:
    response = post(client, {"epochs": 4, "frozen_bn_epochs": 4})
    assert response.status_code == 202, response.text
    spec = response.json()["spec"]
    assert spec["train"]["frozen_bn_epochs"] == 4
    assert train_config(RunCreate.model_validate(spec)).frozen_bn_epochs == 4


@pytest.mark.parametrize(
    ("train", "model", "named"),
    [
        ({"epochs": 3, "frozen_bn_epochs": 4}, {}, ["train.frozen_bn_epochs 4", "train.epochs 3"]),
        ({"frozen_bn_epochs": -1}, {}, ["frozen_bn_epochs"]),
        ({"frozen_bn_epochs": 1.5}, {}, ["frozen_bn_epochs"]),
        ({"frozen_bn_epochs": 1}, {"norm": {"kind": "layer"}}, ["train.frozen_bn_epochs", "'layer'"]),
        ({"frozen_bn_epochs": 1}, {"norm": {"kind": "none"}}, ["train.frozen_bn_epochs", "'none'"]),
        (
            {"frozen_bn_epochs": 1},
            {"norm": {"track_running_stats": False}},
            ["train.frozen_bn_epochs", "without running statistics"],
        ),
    ],
)
def test_bad_frozen_bn_epochs_are_422(
    client: TestClient, train: dict[str, Any], model: dict[str, Any], named: list[str]
) -> None:
    test_bad_switches_are_422_naming_the_field_and_nothing_is_stored(client, train, model, named)


@pytest.mark.parametrize("trainable", ["all", "norm_only", "random_subset"])
def test_trainable_is_echoed_and_reaches_the_train_config(client: TestClient, trainable: str) -> None:
    response = post(client, {"trainable": trainable})
    assert response.status_code == 202, response.text
    spec = response.json()["spec"]
    assert spec["train"]["trainable"] == trainable
    assert train_config(RunCreate.model_validate(spec)).trainable == trainable


@pytest.mark.parametrize(
    ("train", "model", "named"),
    [
        ({"trainable": "norm_only"}, {"norm": {"kind": "none"}}, ["train.trainable", "'none'", "no affine"]),
        ({"trainable": "norm_only"}, {"norm": {"kind": "weight"}}, ["train.trainable", "'weight'"]),
        ({"trainable": "norm_only"}, {"norm": {"kind": "ws"}}, ["train.trainable", "'ws'"]),
        ({"trainable": "norm_only"}, {"norm": {"affine": False}}, ["train.trainable", "affine false"]),
        ({"trainable": "random_subset", "weight_decay": 0.01}, {}, ["random_subset", "weight_decay"]),
        ({"trainable": "bias_only"}, {}, ["trainable"]),
    ],
)
def test_bad_trainable_is_422(
    client: TestClient, train: dict[str, Any], model: dict[str, Any], named: list[str]
) -> None:
    test_bad_switches_are_422_naming_the_field_and_nothing_is_stored(client, train, model, named)


@pytest.mark.parametrize(
    ("train", "k"),
    [
        ({"batch_order": "shuffled"}, None),
        ({"batch_order": "class_sorted"}, None),
        ({"batch_order": "k_classes", "batch_classes": 3}, 3),
    ],
)
def test_batch_order_is_echoed_and_reaches_the_train_config(
    client: TestClient, train: dict[str, Any], k: int | None
) -> None:
    response = post(client, train)
    assert response.status_code == 202, response.text
    spec = response.json()["spec"]
    assert (spec["train"]["batch_order"], spec["train"]["batch_classes"]) == (train["batch_order"], k)
    tcfg = train_config(RunCreate.model_validate(spec))
    assert tcfg.batch_order == train["batch_order"]
    if k is not None:
        assert tcfg.batch_classes == k


@pytest.mark.parametrize(
    ("train", "named"),
    [
        ({"batch_order": "k_classes"}, ["train.batch_classes", "'k_classes'"]),
        ({"batch_order": "class_sorted", "batch_classes": 2}, ["train.batch_classes", "'class_sorted'"]),
        ({"batch_classes": 2}, ["train.batch_classes", "'shuffled'"]),
        ({"batch_order": "k_classes", "batch_classes": 0}, ["batch_classes"]),
        ({"batch_order": "k_classes", "batch_classes": 11}, ["batch_classes 11", "10 classes"]),
        (
            {"batch_order": "k_classes", "batch_classes": 5, "batch_size": 4},
            ["batch_classes 5", "batch_size 4"],
        ),
        ({"batch_order": "label_sorted"}, ["batch_order"]),
    ],
)
def test_bad_batch_order_is_422(client: TestClient, train: dict[str, Any], named: list[str]) -> None:
    test_bad_switches_are_422_naming_the_field_and_nothing_is_stored(client, train, {}, named)
