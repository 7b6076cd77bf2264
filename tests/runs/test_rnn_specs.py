"""The rnn arch's fields of a run spec (docs/deep-lab.md, Recurrent networks) through the real API
(SQLite, folder broker): cell, hidden_size, layers and norm.max_steps echoed normalised; what an rnn
cannot take is a 422 that names the field; data that cannot be read as a sequence is a 422 too."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.ml.datasets import BUILTIN_SHAPES
from service.ml.recurrent import sequence_shape
from service.runs.schemas import RunCreate
from service.runs.spec import model_config

FASHION = {"name": "fashion-mnist", "limit": 200}


def submit(client: TestClient, model: dict[str, Any], dataset: dict[str, Any] = FASHION, **train: Any) -> Any:
    return client.post("/api/v1/runs", json={"dataset": dataset, "model": model, "train": train})


def test_an_rnn_is_echoed_with_its_defaults_and_the_echo_means_the_same(client: TestClient) -> None:
    response = submit(client, {"arch": "rnn", "norm": {"kind": "batch"}})
    assert response.status_code == 202, response.text
    spec = response.json()["spec"]
    model = spec["model"]
    assert (model["cell"], model["hidden_size"], model["layers"]) == ("lstm", 128, 1)
    assert (model["norm"]["position"], model["norm"]["max_steps"]) == ("before_activation", None)
    again = client.post("/api/v1/runs", json=spec)
    assert again.status_code == 202, again.text
    assert again.json()["spec"] == spec
    cfg = model_config(RunCreate.model_validate(spec), BUILTIN_SHAPES["fashion-mnist"])
    assert (cfg.arch, cfg.cell, cfg.hidden_size, cfg.layers) == ("rnn", "lstm", 128, 1)


def test_a_gru_stack_with_a_step_limit(client: TestClient) -> None:
    model = {
        "arch": "rnn",
        "cell": "gru",
        "hidden_size": 32,
        "layers": 2,
        "norm": {"kind": "batch", "max_steps": 10},
    }
    response = submit(client, model)
    assert response.status_code == 202, response.text
    echoed = response.json()["spec"]["model"]
    assert (echoed["cell"], echoed["hidden_size"], echoed["layers"], echoed["norm"]["max_steps"]) == (
        "gru",
        32,
        2,
        10,
    )


@pytest.mark.parametrize(
    ("model", "train", "words"),
    [
        ({"arch": "rnn", "norm": {"kind": "group"}}, {}, "has no recurrent form"),
        ({"arch": "rnn", "norm": {"kind": "frn"}}, {}, "has no recurrent form"),
        ({"arch": "mlp", "cell": "gru"}, {}, "model.cell applies to arch 'rnn'"),
        ({"arch": "cnn", "hidden_size": 8}, {}, "model.hidden_size applies to arch 'rnn'"),
        ({"arch": "mlp", "norm": {"max_steps": 4}}, {}, "max_steps applies to arch 'rnn'"),
        ({"arch": "rnn", "depth": 3}, {}, "model.depth does not apply to arch 'rnn'"),
        ({"arch": "rnn", "activation": "tanh"}, {}, "own σ and tanh"),
        ({"arch": "rnn", "dropout": 0.2}, {}, "not to an rnn's cells"),
        ({"arch": "rnn", "norm": {"position": "after_activation"}}, {}, "does not apply to an rnn"),
        ({"arch": "rnn", "norm": {"example_weight": 0.1}}, {}, "example_weight applies to BatchNorm"),
        ({"arch": "rnn", "cell": "rnn"}, {}, "lstm"),
        ({"arch": "rnn"}, {"frozen_bn_epochs": 1}, "frozen_bn_epochs"),
    ],
)
def test_what_an_rnn_cannot_take_is_a_422_naming_it(
    client: TestClient, model: dict[str, Any], train: dict[str, Any], words: str
) -> None:
    response = submit(client, model, **train)
    assert response.status_code == 422, response.text
    body = response.json()
    assert words in body["detail"] or any(words in str(e) for e in body["errors"]), body


def upload(client: TestClient, x: np.ndarray) -> str:
    buffer = io.BytesIO()
    np.savez(buffer, x=x, y=np.arange(len(x)) % 2)
    response = client.post(
        "/api/v1/datasets", files={"file": ("data.npz", buffer.getvalue())}, data={"name": "seq"}
    )
    assert response.status_code == 201, response.text
    dataset_id: str = response.json()["id"]
    return dataset_id


def test_uploads_are_read_as_sequences_or_refused_with_the_reason(client: TestClient) -> None:
    rng = np.random.default_rng(0)
    sequences = upload(client, rng.random((40, 12, 5), dtype=np.float32))  # [N, T, F]
    ok = submit(client, {"arch": "rnn", "hidden_size": 8}, {"name": "uploaded", "id": sequences})
    assert ok.status_code == 202, ok.text
    too_long = upload(client, rng.random((40, 2000), dtype=np.float32))  # [N, L]: 2000 steps of one value
    refused = submit(client, {"arch": "rnn", "hidden_size": 8}, {"name": "uploaded", "id": too_long})
    assert refused.status_code == 422, refused.text
    assert "at most 1024 steps" in refused.json()["detail"]


@pytest.mark.parametrize(("dataset", "steps"), [("mnist1d", 40), ("synthetic", 28)])
def test_the_built_in_datasets_are_read_as_sequences(client: TestClient, dataset: str, steps: int) -> None:
    response = submit(client, {"arch": "rnn", "hidden_size": 8, "norm": {"kind": "batch"}}, {"name": dataset})
    assert response.status_code == 202, response.text
    spec = RunCreate.model_validate(response.json()["spec"])
    cfg = model_config(spec, BUILTIN_SHAPES[dataset])
    assert sequence_shape(cfg.input_shape)[0] == steps


def test_cifar10_is_read_as_32_rows_of_96_values() -> None:
    # Validated without the API, which would first ask for the CIFAR-10 files.
    spec = RunCreate.model_validate(
        {"dataset": {"name": "cifar10"}, "model": {"arch": "rnn", "hidden_size": 8}}
    )
    cfg = model_config(spec, BUILTIN_SHAPES["cifar10"])
    assert sequence_shape(cfg.input_shape) == (32, 96)
