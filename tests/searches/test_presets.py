"""Search presets: an article claim asked as searches. In-process API on SQLite; the searches are
stored, their studies created and their first trials published (no worker: nothing trains here;
tests/searches/test_search_e2e.py trains searches for real)."""

from __future__ import annotations

import optuna
from fastapi.testclient import TestClient

from service.db import session_scope
from service.models import Run
from service.searches import storage

TINY = {"trials": 2, "seeds": [0, 1], "dataset": "synthetic", "limit": 200, "epochs": 1}


def test_presets_are_listed_with_their_claim_and_searches(client: TestClient) -> None:
    items = client.get("/api/v1/search-presets").json()["items"]
    (preset,) = [p for p in items if p["name"] == "best-lr-with-and-without-bn"]
    assert "higher learning rates" in preset["claim"]
    kinds = [s["base"]["model"]["norm"]["kind"] for s in preset["searches"]]
    assert kinds == ["batch", "none"]
    assert all(list(s["space"]) == ["train.lr"] for s in preset["searches"])


def test_a_preset_starts_its_searches_with_the_overrides(client: TestClient) -> None:
    response = client.post("/api/v1/search-presets/best-lr-with-and-without-bn", json=TINY)
    assert response.status_code == 202, response.text
    started = response.json()["searches"]
    assert [s["spec"]["base"]["model"]["norm"]["kind"] for s in started] == ["batch", "none"]
    for search in started:
        assert search["status"] == "running"
        assert search["spec"]["trials"] == 2
        assert search["spec"]["seeds"] == [0, 1]
        dataset = search["spec"]["base"]["dataset"]
        assert (dataset["name"], dataset["limit"]) == ("synthetic", 200)
        study = optuna.load_study(study_name=search["study_name"], storage=storage.storage())
        assert len(study.trials) == 2  # max_in_flight trials asked at once
    with session_scope() as session:
        runs = session.query(Run).all()
        assert len(runs) == 2 * 2 * 2  # two searches × two trials in flight × two seeds
        kinds = {run.spec["model"]["norm"]["kind"] for run in runs}
        assert kinds == {"batch", "none"}


def test_an_unknown_preset_or_a_bad_override_is_refused_and_starts_nothing(client: TestClient) -> None:
    unknown = client.post("/api/v1/search-presets/no-such-preset", json={})
    assert unknown.status_code == 404
    assert "best-lr-with-and-without-bn" in unknown.json()["detail"]
    bad = client.post("/api/v1/search-presets/best-lr-with-and-without-bn", json={"trials": 0})
    assert bad.status_code == 422
    with session_scope() as session:
        assert session.query(Run).count() == 0
