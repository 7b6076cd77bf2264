"""A search's spec and space are checked before anything is stored: each refusal is a 422 (or a 429
for a key that is busy) saying what is wrong, and leaves no search, study or run behind. In-process
API on SQLite; no worker (tests/searches/test_search_e2e.py trains for real)."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.db import session_scope
from service.models import Run, Search
from service.searches import space
from service.searches.schemas import SearchCreate

BASE = {"dataset": {"name": "synthetic", "limit": 200}, "model": {"hidden": [16]}, "train": {"epochs": 1}}


def search(**changes: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": "lr and norm",
        "base": BASE,
        "space": {
            "train.lr": {"type": "float", "low": 1e-4, "high": 0.3, "log": True},
            "model.norm.kind": {"type": "categorical", "choices": ["none", "batch"]},
        },
        "trials": 4,
        "seeds": [0, 1],
    }
    return spec | changes


def refused(client: TestClient, spec: dict[str, Any], code: int = 422) -> str:
    response = client.post("/api/v1/searches", json=spec)
    assert response.status_code == code, response.text
    with session_scope() as session:
        assert session.query(Search).count() == 0
        assert session.query(Run).count() == 0
    return str(response.json()["detail"]) + str(response.json().get("errors", ""))


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"space": {"train.lr": {"type": "float", "low": 0.1, "high": 0.01}}}, "must be below high"),
        (
            {"space": {"train.lr": {"type": "float", "low": 0, "high": 0.1, "log": True}}},
            "log range needs low > 0",
        ),
        ({"space": {"train.lr": {"type": "float", "low": 0.01, "high": 50}}}, "train.lr"),
        ({"space": {"model.norm.kind": {"type": "categorical", "choices": ["none", "bogus"]}}}, "'bogus'"),
        ({"space": {"train.nonsense": {"type": "int", "low": 1, "high": 3}}}, "nonsense"),
        ({"space": {"train.seed": {"type": "int", "low": 1, "high": 3}}}, "list the seeds in `seeds`"),
        (
            {"space": {"model.hidden": {"type": "categorical", "choices": [[16], [4096, 4096, 4096]]}}},
            "parameter",
        ),
        ({"objective": {"metric": "val_loss", "aggregate": "mean_minus_k_std"}}, "use mean_plus_k_std"),
        ({"objective": {"aggregate": "mean_minus_k_std"}, "seeds": [0]}, "at least 2 seeds"),
        ({"sampler": {"kind": "grid"}}, "train.lr is a float range"),
        ({"trials": 300}, "less than or equal to 200"),
        ({"start_with": [{"train.lr": 0.01}]}, "a value for each of"),
        ({"start_with": [{"train.lr": 5.0, "model.norm.kind": "none"}]}, "outside its range"),
        (
            {
                "space": {"train.lr": {"type": "float", "low": 1e-4, "high": 0.3, "log": True}},
                "pruner": {"kind": "fast"},
            },
            "pruner",
        ),
    ],
)
def test_a_bad_search_is_refused_with_a_reason(
    client: TestClient, changes: dict[str, Any], expected: str
) -> None:
    assert expected in refused(client, search(**changes))


def test_a_grid_smaller_than_the_trials_is_refused(client: TestClient) -> None:
    grid = {"model.norm.kind": {"type": "categorical", "choices": ["none", "batch"]}}
    detail = refused(client, search(space=grid, sampler={"kind": "grid"}, trials=3))
    assert "the grid sampler has 2 points but trials is 3" in detail


def test_trials_times_seeds_over_the_cap_is_refused(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BNLAB_MAX_ACTIVE_RUNS_PER_KEY", "7")
    from service.config import get_settings

    get_settings.cache_clear()
    detail = refused(client, search(trials=4, seeds=[0, 1]))
    assert "4 × 2 = 8 runs, over the key's cap of 7" in detail


def test_defaults_and_the_optuna_space() -> None:
    spec = SearchCreate.model_validate(
        search(
            space={
                "model.hidden": {"type": "categorical", "choices": [[16], [32, 32]]},
                "train.epochs": {"type": "int", "low": 1, "high": 5, "step": 2},
            },
            objective={"metric": "val_loss"},
        )
    )
    assert spec.direction() == "minimize"
    assert spec.max_in_flight == 2
    dists = space.distributions(spec)
    assert dists["model.hidden"].choices == ("[16]", "[32, 32]")  # type: ignore[attr-defined]
    assert space.decode(spec, {"model.hidden": "[32, 32]", "train.epochs": 3}) == {
        "model.hidden": [32, 32],
        "train.epochs": 3,
    }
    assert space.grid_space(spec)["train.epochs"] == [1, 3, 5]
    assert space.aggregate(spec.objective, [0.5, 0.7]) == pytest.approx((0.6, 0.6, 0.1414213562))
    robust = SearchCreate.model_validate(
        search(objective={"aggregate": "mean_minus_k_std", "k": 2})
    ).objective
    value, mean, std = space.aggregate(robust, [0.5, 0.7])
    assert value == pytest.approx(0.6 - 2 * 0.1414213562)


def test_cmaes_searches_numeric_ranges(client: TestClient) -> None:
    assert client.post("/api/v1/searches", json=search(sampler={"kind": "cmaes"})).status_code == 202
