"""Cards through the in-process API on a migrated SQLite database and the embedded broker. No worker
runs here: metrics are written as a worker writes them; tests/integration/test_cards_e2e.py trains
every available card for real at the test scale."""

from __future__ import annotations

import dataclasses
import io
import random
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.cards.catalogue import CARDS
from service.db import session_scope
from service.main import create_app
from service.models import EpochMetric, Run
from tests.conftest import Backend, sqlite_backend_at


@pytest.fixture
def client(tmp_path: Path, use_backend: Callable[[Backend], None]) -> Iterator[TestClient]:
    use_backend(sqlite_backend_at(tmp_path))
    with TestClient(create_app()) as test_client:
        yield test_client


def finish(experiment_ids: list[str], accuracy: Callable[[dict[str, Any], int], float]) -> None:
    """What a worker writes for every run of the experiments: two epochs, then succeeded."""
    with session_scope() as session:
        runs = session.query(Run).filter(Run.experiment_id.in_(experiment_ids)).all()
        for run in runs:
            acc = accuracy(run.grid_point or {}, int(run.spec["train"]["seed"]))
            for epoch, value in ((1, acc - 0.05), (2, acc)):
                session.add(
                    EpochMetric(
                        run_id=run.id,
                        epoch=epoch,
                        train_loss=1.0 - value,
                        train_accuracy=value,
                        val_loss=1.1 - value,
                        val_accuracy=value,
                        seconds=0.1,
                    )
                )
            run.epochs_done, run.status, run.finished_at = 2, "succeeded", datetime.now(UTC)


def test_the_cards_list_says_what_each_needs_and_estimates_the_available_ones(client: TestClient) -> None:
    items = client.get("/api/v1/cards").json()["items"]
    assert [c["name"] for c in items] == list(CARDS)
    for card in items:
        assert card["claims"]
        assert card["citation"]
        assert card["differences"]
        if card["available"]:
            assert card["unavailable_reason"] is None
            assert card["estimated_seconds"]["quick"] > 0
        else:
            assert card["unavailable_reason"].startswith("needs ")
    seed = client.get("/api/v1/cards/article-seed").json()
    assert seed["claims"][0]["direction"] == "negative"
    assert seed["runs"]["quick"] == 10
    assert client.get("/api/v1/cards/no-such-card").status_code == 404


def test_an_unavailable_card_is_409_naming_what_is_missing(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every catalogued card runs on this build: a card written for a feature still to come stands in.
    future = dataclasses.replace(
        CARDS["cooijmans-2016"],
        name="future-transformer",
        needs="the attention archs: model.arch transformer",
        base={"model": {"arch": "transformer"}},
    )
    monkeypatch.setitem(CARDS, future.name, future)
    answer = client.post(f"/api/v1/cards/{future.name}", json={"scale": "test"})
    assert answer.status_code == 409
    assert "model.arch transformer" in answer.json()["detail"]
    assert client.get("/api/v1/experiments").json()["total"] == 0


@pytest.mark.parametrize(
    "body",
    [
        {"scale": "huge"},
        {"seeds": [0]},
        {"seeds": [0, 0]},
        {"dataset": "uploaded"},
        {"epochs": 3},
        {"seeds": [True, 1]},
    ],
)
def test_bad_overrides_are_422(client: TestClient, body: dict[str, Any]) -> None:
    answer = client.post("/api/v1/cards/higher-lr", json=body)
    assert answer.status_code == 422, answer.text
    assert client.get("/api/v1/experiments").json()["total"] == 0


def test_a_card_run_reports_paired_verdicts_holm_and_draws_its_figure(client: TestClient) -> None:
    started = client.post("/api/v1/cards/higher-lr", json={"scale": "test", "seeds": [0, 1, 2, 3, 4]})
    assert started.status_code == 202, started.text
    report = started.json()
    assert started.headers["location"] == f"/api/v1/cards/higher-lr/runs/{report['run_id']}"
    assert report["finished"] is False
    assert all(c["verdict"] is None for c in report["claims"])
    assert report["runs"]["queued"] == 20
    assert report["scale"] == "test"
    assert report["dataset"] == "synthetic"

    noise = random.Random(0)
    # BN at lr 0.3 far above none, and it loses far less than none from lr 0.01 to 0.3.
    table = {("batch", 0.01): 0.9, ("none", 0.01): 0.85, ("batch", 0.3): 0.88, ("none", 0.3): 0.60}
    finish(
        report["experiments"],
        lambda p, seed: table[(p["model.norm.kind"], p["train.lr"])] + noise.gauss(0, 0.01),
    )

    done = client.get(report["figure_png"].rsplit("/", 1)[0]).json()
    assert done["finished"] is True
    assert done["measured_seconds"] is not None
    assert done["measured_seconds"] >= 0
    high, drop = done["claims"]
    assert high["name"] == "bn-at-high-lr"
    assert high["verdict"] == "supported"
    assert high["n"] == 5
    assert high["ci_low"] < high["effect"] < high["ci_high"]
    assert high["hedges_g"] > 0
    p_values = sorted(c["p_value"] for c in done["claims"])
    assert min(c["adjusted_p"] for c in done["claims"]) == pytest.approx(min(1, 2 * p_values[0]))
    assert drop["seeds_for_power"] is not None
    assert done["summary"].startswith("Of 2 claims")
    assert done["verdict_rule"]

    png = client.get(done["figure_png"])
    assert png.status_code == 200
    assert Image.open(io.BytesIO(png.content)).size == (1200, 500)
    svg = ET.fromstring(client.get(done["figure_svg"]).content)
    gids = [e.get("id", "") for e in svg.iter()]
    assert sum(g.startswith("claim-") for g in gids) == 2
    assert sum(g.startswith("curve-") for g in gids) == 2

    assert client.get("/api/v1/cards/higher-lr/report").json()["run_id"] == report["run_id"]
    assert client.get("/api/v1/cards/higher-lr").json()["last_run"]["id"] == report["run_id"]
    overview = {r["card"]: r for r in client.get("/api/v1/replications").json()["items"]}
    assert overview["higher-lr"]["verdicts"]["bn-at-high-lr"] == "supported"
    assert overview["higher-lr"]["measured_seconds"] is not None
    assert overview["cooijmans-2016"]["available"] is True
    assert overview["cooijmans-2016"]["last_run"] is None  # never run here
    # The card's experiments stay experiments: their own report and plot work.
    experiment = report["experiments"][0]
    assert client.get(f"/api/v1/experiments/{experiment}/report").status_code == 200
    assert client.get(f"/api/v1/cards/small-batch/runs/{report['run_id']}").status_code == 404


def test_the_figure_is_409_before_any_epoch(client: TestClient) -> None:
    report = client.post("/api/v1/cards/deep-sigmoid", json={"scale": "test"}).json()
    assert client.get(report["figure_png"]).status_code == 409


def test_a_card_whose_grid_sets_the_depth_reports_its_estimate(client: TestClient) -> None:
    # The stored spec is the normalised one (hidden filled in): the estimate comes from the card's grids.
    answer = client.post("/api/v1/cards/article-depth", json={"scale": "test"})
    assert answer.status_code == 202, answer.text
    report = answer.json()
    assert report["estimated_seconds"] > 0
    assert len(report["experiments"]) == 3
    assert client.get(f"/api/v1/cards/article-depth/runs/{report['run_id']}").status_code == 200
