"""The deep lab's architecture fields of a run spec (docs/deep-lab.md) through the real API (SQLite,
folder broker): deep mlps by depth × width, resnet and resmlp with their block, shortcut and init.
Bad combinations are a 422 naming the field; good ones are echoed normalised, and the echo is itself
a spec that means the same."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.ml.datasets import BUILTIN_SHAPES
from service.ml.nets import parameter_count
from service.runs.schemas import MAX_PARAMETERS, RunCreate
from service.runs.spec import model_config

DATA = {"name": "synthetic", "limit": 200}
FASHION = {"name": "fashion-mnist", "limit": 1000}


def submit(client: TestClient, model: dict[str, Any], dataset: dict[str, Any] = DATA) -> Any:
    return client.post("/api/v1/runs", json={"dataset": dataset, "model": model})


def echo_round_trips(client: TestClient, response: Any) -> dict[str, Any]:
    assert response.status_code == 202, response.text
    spec: dict[str, Any] = response.json()["spec"]
    again = client.post("/api/v1/runs", json=spec)
    assert again.status_code == 202, again.text
    assert again.json()["spec"] == spec
    return spec


def test_depth_times_width_is_an_mlp_shorthand_echoed_as_hidden(client: TestClient) -> None:
    model = echo_round_trips(client, submit(client, {"depth": 100, "width": 128}))["model"]
    assert model["hidden"] == [128] * 100
    assert (model["depth"], model["width"]) == (100, 128)
    assert (model["block"], model["shortcut"], model["init"]) == (None, None, "default")


def test_an_mlp_given_by_hidden_echoes_its_depth_and_uniform_width(client: TestClient) -> None:
    article = echo_round_trips(client, submit(client, {}))["model"]
    assert (article["hidden"], article["depth"], article["width"]) == ([128], 1, 128)
    uneven = echo_round_trips(client, submit(client, {"hidden": [64, 32]}))["model"]
    assert (uneven["depth"], uneven["width"]) == (2, None)
    three = submit(client, {"depth": 3}).json()["spec"]["model"]
    assert three["hidden"] == [128] * 3  # width defaults to the default hidden width


@pytest.mark.parametrize("depth", [20, 56, 110])
def test_resnets_are_accepted_on_fashion_mnist_and_echoed_with_their_defaults(
    client: TestClient, depth: int
) -> None:
    spec = echo_round_trips(client, submit(client, {"arch": "resnet", "depth": depth}, FASHION))
    model = spec["model"]
    assert (model["depth"], model["width"], model["block"], model["shortcut"]) == (
        depth,
        16,
        "post_activation",
        "zero_pad",
    )
    assert model["norm"]["position"] == "before_activation"
    assert model["init"] == "default"


def test_resnet_defaults_and_resmlp_defaults(client: TestClient) -> None:
    resnet = submit(client, {"arch": "resnet"}, FASHION).json()["spec"]["model"]
    assert (resnet["depth"], resnet["width"]) == (20, 16)
    resmlp = echo_round_trips(client, submit(client, {"arch": "resmlp", "block": "pre_activation"}))["model"]
    assert (resmlp["depth"], resmlp["width"], resmlp["block"], resmlp["shortcut"]) == (
        8,
        128,
        "pre_activation",
        None,
    )


@pytest.mark.parametrize("init", ["fixup", "skipinit"])
@pytest.mark.parametrize("arch", ["resnet", "resmlp"])
def test_fixup_and_skipinit_without_normalisation_are_accepted(
    client: TestClient, arch: str, init: str
) -> None:
    model = {"arch": arch, "init": init, "norm": {"kind": "none"}}
    assert echo_round_trips(client, submit(client, model, FASHION))["model"]["init"] == init


NORM_KINDS = (
    "batch",
    "layer",
    "group",
    "instance",
    "batch_renorm",
    "ghost",
    "weight",
    "batch_layer",
    "noisy_batch",
    "ws",
    "none",
)


@pytest.mark.parametrize("kind", NORM_KINDS)
@pytest.mark.parametrize("block", ["post_activation", "pre_activation"])
def test_every_norm_kind_is_accepted_by_a_resnet(client: TestClient, kind: str, block: str) -> None:
    model = {"arch": "resnet", "depth": 8, "block": block, "norm": {"kind": kind, "num_groups": 8}}
    response = submit(client, model, FASHION)
    assert response.status_code == 202, response.text


@pytest.mark.parametrize(
    ("model", "dataset", "named"),
    [
        ({"arch": "resnet", "depth": 21}, FASHION, ["6n + 2", "depth 21"]),
        ({"arch": "resnet", "depth": 2}, FASHION, ["6n + 2"]),
        ({"arch": "resnet", "depth": 134}, FASHION, ["depth"]),  # above MAX_DEPTH
        ({"arch": "resmlp", "depth": 9}, DATA, ["2·blocks + 2"]),
        ({"depth": 129}, DATA, ["depth"]),
        ({"hidden": [8] * 129}, DATA, ["hidden"]),
        ({"depth": 3, "hidden": [8, 8]}, DATA, ["model.hidden", "conflicts", "depth 3"]),
        ({"width": 64, "hidden": [8]}, DATA, ["conflicts", "width 64"]),
        ({"arch": "resnet", "width": 200}, FASHION, ["width"]),
        ({"arch": "resnet"}, {"name": "mnist1d"}, ["'resnet' needs image data", "resmlp"]),
        ({"arch": "resnet", "dropout": 0.1}, FASHION, ["model.dropout", "residual"]),
        ({"arch": "resnet", "block": "sideways"}, FASHION, ["block"]),
        ({"arch": "resnet", "shortcut": "dense"}, FASHION, ["shortcut"]),
        ({"arch": "resmlp", "shortcut": "projection"}, DATA, ["model.shortcut", "resnet"]),
        ({"block": "pre_activation"}, DATA, ["model.block", "'mlp'"]),
        ({"arch": "cnn", "depth": 20}, FASHION, ["model.depth", "'cnn'"]),
        ({"init": "fixup", "norm": {"kind": "none"}}, DATA, ["model.init fixup", "residual blocks"]),
        ({"arch": "resnet", "init": "fixup"}, FASHION, ["model.init fixup", "norm.kind none", "'batch'"]),
        ({"arch": "resmlp", "init": "skipinit", "norm": {"kind": "layer"}}, DATA, ["skipinit", "'layer'"]),
        ({"arch": "resnet", "init": "lsuv"}, FASHION, ["init"]),
        ({"arch": "resmlp", "norm": {"kind": "instance"}}, DATA, ["instance", "'resnet'"]),
        ({"arch": "resnet", "norm": {"kind": "frn"}}, FASHION, ["frn", "residual block", "'mlp' or 'cnn'"]),
        (
            {"arch": "resnet", "norm": {"kind": "group", "num_groups": 32}},
            FASHION,
            ["num_groups 32", "model.width (× 1, 2, 4)", "[16]"],
        ),
        (
            {"arch": "resnet", "norm": {"position": "after_activation"}},
            FASHION,
            ["after_activation", "block"],
        ),
    ],
)
def test_bad_deep_specs_are_422_naming_the_field(
    client: TestClient, model: dict[str, Any], dataset: dict[str, Any], named: list[str]
) -> None:
    response = submit(client, model, dataset)
    assert response.status_code == 422, response.text
    for name in named:
        assert name in response.text, (name, response.text)
    assert client.get("/api/v1/runs").json()["total"] == 0


def test_the_422_of_a_spec_over_the_parameter_budget_says_the_budget(client: TestClient) -> None:
    response = submit(client, {"depth": 128, "width": 4096})
    assert response.status_code == 422
    assert f"the limit is {MAX_PARAMETERS:,} parameters (the service's parameter budget)" in response.text


def test_the_spec_becomes_the_model_config_that_trains() -> None:
    spec = RunCreate.model_validate(
        {
            "model": {"arch": "resnet", "depth": 110, "block": "pre_activation", "shortcut": "projection"},
            "dataset": FASHION,
        }
    )
    cfg = model_config(spec, BUILTIN_SHAPES["fashion-mnist"])
    assert (cfg.arch, cfg.depth, cfg.width, cfg.block, cfg.shortcut, cfg.residual_init) == (
        "resnet",
        110,
        16,
        "pre_activation",
        "projection",
        "default",
    )
    assert parameter_count(cfg) < MAX_PARAMETERS
    fixup = RunCreate.model_validate(
        {"model": {"arch": "resmlp", "init": "fixup", "norm": {"kind": "none"}, "width": 64}, "dataset": DATA}
    )
    fixup_cfg = model_config(fixup, BUILTIN_SHAPES["synthetic"])
    assert (fixup_cfg.residual_init, fixup_cfg.width, fixup_cfg.depth) == ("fixup", 64, 8)


def test_a_resmlp_trains_on_vector_data() -> None:
    spec = RunCreate.model_validate({"model": {"arch": "resmlp", "depth": 4}, "dataset": {"name": "mnist1d"}})
    assert model_config(spec, BUILTIN_SHAPES["mnist1d"]).input_shape == (40,)
