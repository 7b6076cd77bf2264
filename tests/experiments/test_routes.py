"""Experiments and presets through the in-process API, on a migrated SQLite database and the
embedded folder broker. No worker runs here: metrics are written as a worker writes them (rows in
epoch_metrics and layer_stats); tests/integration/test_experiments_e2e.py trains for real.
"""

from __future__ import annotations

import base64
import io
import json
import statistics
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.config import get_settings
from service.db import session_scope
from service.main import create_app
from service.models import EpochMetric, LayerStat, Run
from tests.conftest import Backend, sqlite_backend_at
from tests.integration.stack import free_port

EXPERIMENT = {
    "name": "small",
    "base": {"dataset": {"name": "synthetic", "limit": 200}, "train": {"epochs": 3}},
    "grid": {"model.norm.kind": ["none", "batch"], "train.lr": [0.001, 0.01]},
    "seeds": [0, 1],
}


@pytest.fixture
def make_client(
    tmp_path: Path, use_backend: Callable[[Backend], None]
) -> Iterator[Callable[..., TestClient]]:
    clients: list[TestClient] = []

    def make(**env: str) -> TestClient:
        backend = sqlite_backend_at(tmp_path)
        backend.env |= env
        use_backend(backend)
        clients.append(TestClient(create_app()).__enter__())
        return clients[-1]

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client: Callable[..., TestClient]) -> TestClient:
    return make_client()


def queued_messages() -> list[Path]:
    return sorted((get_settings().broker_folder / "queue").glob("*.msg"))


def published_run_ids() -> list[str]:
    """The queued messages' run ids, in the order the worker takes them (the folder's sorted order)."""
    ids = []
    for path in queued_messages():
        message = json.loads(path.read_bytes())
        args, _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
        ids.append(args[0])
    return ids


def nothing_stored(client: TestClient) -> None:
    assert client.get("/api/v1/experiments").json()["total"] == 0
    assert client.get("/api/v1/runs").json()["total"] == 0
    assert queued_messages() == []


def write_epochs(run_id: str, accuracies: list[float], *, status: str = "succeeded") -> None:
    """What a worker writes: one row per finished epoch, then the final status."""
    with session_scope() as session:
        run = session.get(Run, run_id)
        assert run is not None
        for epoch, acc in enumerate(accuracies, start=1):
            session.add(
                EpochMetric(
                    run_id=run_id,
                    epoch=epoch,
                    train_loss=1.2 - acc,
                    train_accuracy=acc + 0.02,
                    val_loss=1.0 - acc,
                    val_accuracy=acc,
                    seconds=0.1,
                )
            )
        run.epochs_done = len(accuracies)
        run.status = status


def test_submit_creates_one_queued_run_per_grid_point_and_seed(client: TestClient) -> None:
    response = client.post("/api/v1/experiments", json=EXPERIMENT)
    assert response.status_code == 202, response.text
    body = response.json()
    assert response.headers["location"] == f"/api/v1/experiments/{body['id']}"
    runs = body["runs"]
    assert len(runs) == 8
    assert body["status_counts"]["queued"] == 8
    assert body["finished"] is False
    assert [(r["grid_point"]["model.norm.kind"], r["grid_point"]["train.lr"], r["seed"]) for r in runs] == [
        (kind, lr, seed) for kind in ("none", "batch") for lr in (0.001, 0.01) for seed in (0, 1)
    ]
    assert runs[3]["name"] == "small: norm=none lr=0.01 seed=1"
    assert runs[3]["config"] == "norm=none lr=0.01"
    spec = client.get(f"/api/v1/runs/{runs[3]['id']}").json()["spec"]
    assert (spec["model"]["norm"]["kind"], spec["train"]["lr"], spec["train"]["seed"]) == ("none", 0.01, 1)
    assert spec["dataset"]["limit"] == 200
    assert len(queued_messages()) == 8  # each run published once, by task name
    listed = client.get("/api/v1/runs", params={"experiment_id": body["id"], "limit": 100}).json()
    assert sorted(r["id"] for r in listed["items"]) == sorted(r["id"] for r in runs)
    client.post("/api/v1/runs", json={"dataset": {"name": "synthetic", "limit": 100}})
    assert client.get("/api/v1/runs", params={"experiment_id": body["id"]}).json()["total"] == 8
    assert client.get("/api/v1/runs").json()["total"] == 9
    assert client.get("/api/v1/experiments").json()["items"][0]["id"] == body["id"]
    assert client.get(f"/api/v1/experiments/{body['id']}").json()["spec"]["seeds"] == [0, 1]


def test_an_experiments_runs_are_published_longest_first(client: TestClient) -> None:
    # Runs of 2,000 samples and of 200, in grid order small ones first: the cost model's longest
    # runs go to the queue first, so the training processes end on the short ones, nearly together.
    spec = {
        "name": "sizes",
        "base": {"dataset": {"name": "synthetic"}, "train": {"epochs": 2}},
        "grid": {"dataset.limit": [200, 2000], "model.norm.kind": ["none", "batch"]},
        "seeds": [0, 1],
    }
    response = client.post("/api/v1/experiments", json=spec)
    assert response.status_code == 202, response.text
    runs = {run["id"]: run for run in response.json()["runs"]}
    assert [run["grid_point"]["dataset.limit"] for run in runs.values()] == [200] * 4 + [2000] * 4
    published = published_run_ids()
    assert sorted(published) == sorted(runs)
    assert [runs[run_id]["grid_point"]["dataset.limit"] for run_id in published] == [2000] * 4 + [200] * 4
    # Equal estimates keep the grid's order: each configuration's seed 0 before its seed 1.
    seeds = {config: [runs[i]["seed"] for i in published if runs[i]["config"] == config] for config in
             {run["config"] for run in runs.values()}}  # fmt: skip
    assert all(order == [0, 1] for order in seeds.values()), seeds


def upload_features(client: TestClient) -> str:
    """A 60-sample dataset of 6 features and 3 classes, uploaded; its id."""
    buffer = io.BytesIO()
    x = np.random.default_rng(0).normal(size=(60, 6)).astype(np.float32)
    np.savez(buffer, x=x, y=np.arange(60) % 3)
    uploaded = client.post(
        "/api/v1/datasets", files={"file": ("d.npz", buffer.getvalue())}, data={"name": "f"}
    )
    assert uploaded.status_code == 201, uploaded.text
    return str(uploaded.json()["id"])


def test_an_experiment_on_an_upload_is_priced_on_its_shape_and_published_longest_first(
    client: TestClient,
) -> None:
    # Priced on the upload's stored shape (6 features): the 256 × 256 network's run goes first.
    spec = {
        "name": "on-upload",
        "base": {"dataset": {"name": "uploaded", "id": upload_features(client)}, "train": {"epochs": 1}},
        "grid": {"model.hidden": [[8], [256, 256]]},
        "seeds": [0],
    }
    response = client.post("/api/v1/experiments", json=spec)
    assert response.status_code == 202, response.text
    runs = response.json()["runs"]
    assert [run["grid_point"]["model.hidden"] for run in runs] == [[8], [256, 256]]  # the grid's order
    assert published_run_ids() == [runs[1]["id"], runs[0]["id"]]


def test_a_grid_over_uploads_checks_every_one_and_stores_nothing_when_one_is_missing(
    client: TestClient,
) -> None:
    # Each upload the grid names is checked, not only the first run's: the missing one is a 422 at
    # submit time rather than a run that fails as it loads its data.
    present, missing = upload_features(client), "0" * 32
    spec = {
        "name": "two-uploads",
        "base": {"dataset": {"name": "uploaded", "id": present}, "train": {"epochs": 1}},
        "grid": {"dataset.id": [present, missing]},
        "seeds": [0],
    }
    response = client.post("/api/v1/experiments", json=spec)
    assert response.status_code == 422, response.text
    assert missing in response.json()["detail"]
    assert client.get("/api/v1/experiments").json()["total"] == 0
    assert published_run_ids() == []


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"grid": {"model.norm.kind": ["none", "bogus"]}},
            "grid point norm=bogus (seed 0) makes an invalid run",
        ),
        ({"grid": {"train.batch_size": [32, 1]}}, "train.batch_size"),
        ({"grid": {"train.lr": [0.001 * i for i in range(1, 12)]}, "seeds": list(range(6))}, "66 runs"),
        ({"grid": {"model.hidden.x": [1]}}, "model.hidden"),
        ({"base": {"dataset": {"name": "mnist"}}}, "mnist"),
    ],
)
def test_an_invalid_experiment_is_422_with_the_point_and_field_and_stores_nothing(
    client: TestClient, change: dict[str, Any], message: str
) -> None:
    response = client.post("/api/v1/experiments", json=EXPERIMENT | change)
    assert response.status_code == 422, response.text
    assert message in response.json()["detail"]
    nothing_stored(client)


@pytest.mark.parametrize(
    "change",
    [
        {"grid": {"train.seed": [1, 2]}},
        {"grid": {"train.lr": [0.1, 0.1]}},
        {"seeds": [1, 1]},
        {"seeds": []},
        {"name": "a/b"},
        {"grid": {"../x": [1]}},
        {"unknown": 1},
    ],
)
def test_malformed_experiment_bodies_are_422(client: TestClient, change: dict[str, Any]) -> None:
    assert client.post("/api/v1/experiments", json=EXPERIMENT | change).status_code == 422
    nothing_stored(client)


def test_the_active_run_cap_counts_the_whole_experiment(make_client: Callable[..., TestClient]) -> None:
    client = make_client(BNLAB_MAX_ACTIVE_RUNS_PER_KEY="9")
    client.post("/api/v1/runs", json={"dataset": {"name": "synthetic", "limit": 100}})
    client.post("/api/v1/runs", json={"dataset": {"name": "synthetic", "limit": 100}})
    response = client.post("/api/v1/experiments", json=EXPERIMENT)  # 2 + 8 > 9
    assert response.status_code == 429
    assert "this request would add 8" in response.json()["detail"]
    assert response.headers["retry-after"] == "30"
    assert client.get("/api/v1/experiments").json()["total"] == 0
    assert client.post("/api/v1/experiments", json=EXPERIMENT | {"seeds": [0]}).status_code == 202  # 2 + 4


def test_broker_down_after_commit_is_503_and_the_runs_stay_queued(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(BNLAB_BROKER_URL=f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    response = client.post("/api/v1/experiments", json=EXPERIMENT)
    assert response.status_code == 503, response.text
    assert "saved as queued" in response.json()["detail"]
    location = response.headers["location"]
    experiment = client.get(location).json()
    assert experiment["status_counts"]["queued"] == 8
    with session_scope() as session:  # the reaper publishes runs never enqueued
        assert all(session.get(Run, r["id"]).enqueued_at is None for r in experiment["runs"])  # type: ignore[union-attr]


def test_cancel_cancels_every_run_that_has_not_ended(client: TestClient) -> None:
    body = client.post("/api/v1/experiments", json=EXPERIMENT).json()
    write_epochs(body["runs"][0]["id"], [0.5, 0.6, 0.7])
    cancelled = client.post(f"/api/v1/experiments/{body['id']}/cancel")
    assert cancelled.status_code == 200
    assert cancelled.json()["status_counts"] == {
        "queued": 0,
        "running": 0,
        "succeeded": 1,
        "failed": 0,
        "cancelled": 7,
    }
    assert cancelled.json()["finished"] is True
    assert client.post(f"/api/v1/experiments/{'0' * 32}/cancel").status_code == 404


def finish_all(body: dict[str, Any]) -> dict[str, list[float]]:
    """Per run, made-up accuracies: batch better than none, lr 0.01 better than 0.001, seeds apart."""
    written = {}
    for r in body["runs"]:
        point, seed = r["grid_point"], r["seed"]
        top = 0.6 + 0.2 * (point["model.norm.kind"] == "batch") + 0.05 * (point["train.lr"] == 0.01)
        accs = [top - 0.2 + 0.01 * seed, top - 0.1 + 0.01 * seed, top + 0.02 * seed]
        write_epochs(r["id"], accs)
        written[r["id"]] = accs
    return written


def test_report_figures_are_the_stored_metrics_over_seeds(client: TestClient) -> None:
    body = client.post("/api/v1/experiments", json=EXPERIMENT | {"target": 0.79}).json()
    finish_all(body)
    report = client.get(f"/api/v1/experiments/{body['id']}/report").json()
    assert report["finished"] is True
    assert [c["config"] for c in report["configurations"]] == [
        "norm=none lr=0.001",
        "norm=none lr=0.01",
        "norm=batch lr=0.001",
        "norm=batch lr=0.01",
    ]
    for config in report["configurations"]:
        runs = [r for r in body["runs"] if r["config"] == config["config"]]
        epochs = [client.get(f"/api/v1/runs/{r['id']}/metrics").json()["epochs"] for r in runs]
        for metric in ("val_accuracy", "val_loss", "train_accuracy", "train_loss"):
            finals = [e[-1][metric] for e in epochs]
            assert config["final"][metric]["mean"] == pytest.approx(statistics.fmean(finals))
            assert config["final"][metric]["std"] == pytest.approx(statistics.stdev(finals))
        best_losses = [min(row["val_loss"] for row in e) for e in epochs]
        assert config["best"]["val_loss"]["values"] == pytest.approx(best_losses)
        first = [next((row["epoch"] for row in e if row["val_accuracy"] >= 0.79), None) for e in epochs]
        assert list(config["epochs_to_target"]["per_seed"].values()) == first
    winners = {w["metric"]: w for w in report["winners"]}
    assert winners["final.val_accuracy"]["config"] == "norm=batch lr=0.01"
    assert winners["final.val_loss"]["config"] == "norm=batch lr=0.01"
    assert report["claims"] == []
    other_target = client.get(f"/api/v1/experiments/{body['id']}/report", params={"target": 0.5}).json()
    assert other_target["configurations"][3]["epochs_to_target"]["per_seed"] == {"0": 1, "1": 1}
    assert client.get(f"/api/v1/experiments/{body['id']}/report", params={"target": 2}).status_code == 422
    assert client.get(f"/api/v1/experiments/{'0' * 32}/report").status_code == 404


def distinct_colours(png: bytes) -> int:
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG"
    colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None
    return len(colours)


def svg_ids(svg: bytes, prefix: str) -> list[str]:
    root = ET.fromstring(svg)
    return [el.attrib["id"] for el in root.iter() if el.attrib.get("id", "").startswith(prefix)]


def test_plots_draw_a_mean_curve_and_band_per_configuration(client: TestClient) -> None:
    body = client.post("/api/v1/experiments", json=EXPERIMENT).json()
    plot = f"/api/v1/experiments/{body['id']}/plot"
    early = client.get(f"{plot}.png")
    assert early.status_code == 409
    assert "no finished epoch" in early.json()["detail"]
    finish_all(body)
    png = client.get(f"{plot}.png")
    assert png.status_code == 200
    assert png.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(png.content)).size == (800, 500)
    assert distinct_colours(png.content) > 50  # curves, bands and text, not a blank canvas
    svg = client.get(f"{plot}.svg", params={"metric": "accuracy"})
    assert svg.headers["content-type"].startswith("image/svg+xml")
    assert len(svg_ids(svg.content, "curve-")) == 4 * 2  # train and validation per configuration
    assert len(svg_ids(svg.content, "band-")) == 4 * 2  # two seeds apart: a visible band each
    assert b"Training and Validation Accuracy" in svg.content
    assert client.get(f"{plot}.svg", params={"metric": "loss"}).content != svg.content
    assert client.get(f"{plot}.gif").status_code == 422
    assert client.get(f"{plot}.png", params={"metric": "activations"}).status_code == 422


def test_run_plot_curves_and_activations(client: TestClient) -> None:
    run_id = client.post("/api/v1/runs", json={"dataset": {"name": "synthetic", "limit": 100}}).json()["id"]
    assert client.get(f"/api/v1/runs/{run_id}/plot.png").status_code == 409
    no_stats = client.get(f"/api/v1/runs/{run_id}/plot.png", params={"metric": "activations"})
    assert no_stats.status_code == 409
    assert "no layer statistics" in no_stats.json()["detail"]
    write_epochs(run_id, [0.5, 0.6], status="running")
    png = client.get(f"/api/v1/runs/{run_id}/plot.png", params={"metric": "accuracy"})
    assert png.status_code == 200
    assert distinct_colours(png.content) > 20
    svg = client.get(f"/api/v1/runs/{run_id}/plot.svg").content
    assert len(svg_ids(svg, "curve-")) == 2
    assert svg_ids(svg, "band-") == []  # one run: no spread to draw
    with session_scope() as session:
        for epoch in range(3):
            for layer in ("bn1", "bn2", "bn10"):
                session.add(
                    LayerStat(run_id=run_id, epoch=epoch, layer=layer, input_mean=0.1 * epoch, input_std=1.0)
                )
    svg = client.get(f"/api/v1/runs/{run_id}/plot.svg", params={"metric": "activations"}).content
    assert len(svg_ids(svg, "curve-mean-")) == 3
    assert len(svg_ids(svg, "curve-std-")) == 3
    assert svg.index(b"bn2") < svg.index(b"bn10")  # legend in slot order
    png = client.get(f"/api/v1/runs/{run_id}/plot.png", params={"metric": "activations"})
    assert Image.open(io.BytesIO(png.content)).size == (800, 750)
    assert client.get(f"/api/v1/runs/{'0' * 32}/plot.png").status_code == 404


def test_presets_list_and_start_with_overrides(client: TestClient) -> None:
    listed = client.get("/api/v1/presets").json()["items"]
    assert [p["name"] for p in listed] == [
        "seed-keras",
        "higher-lr",
        "small-batch",
        "deep-sigmoid",
        "init-scale",
    ]
    for preset in listed:
        assert preset["runs"] > 0
        assert preset["estimated_seconds"] > 0
        assert preset["claim"]
    started = client.post("/api/v1/presets/deep-sigmoid", json={"seeds": [5], "dataset": "synthetic"})
    assert started.status_code == 202, started.text
    body = started.json()
    assert (body["preset"], body["spec"]["seeds"], len(body["runs"])) == ("deep-sigmoid", [5], 2)
    spec = client.get(f"/api/v1/runs/{body['runs'][1]['id']}").json()["spec"]
    assert (spec["dataset"]["name"], spec["model"]["hidden"], spec["model"]["norm"]["kind"]) == (
        "synthetic",
        [100, 100, 100],
        "batch",
    )
    claims = client.get(f"/api/v1/experiments/{body['id']}/report").json()["claims"]
    assert len(claims) == 2
    assert {c["verdict"] for c in claims} == {"inconclusive"}  # nothing has trained yet
    assert client.post("/api/v1/presets/deep-sigmoid").status_code == 202  # no body: the defaults
    unknown = client.post("/api/v1/presets/nope")
    assert unknown.status_code == 404
    assert "seed-keras" in unknown.json()["detail"]
    assert client.post("/api/v1/presets/deep-sigmoid", json={"seeds": []}).status_code == 422
    assert client.post("/api/v1/presets/deep-sigmoid", json={"grid": {}}).status_code == 422
    # An upload has no id a preset could name: refused as input, not a 500 (found by make fuzz).
    uploaded = client.post("/api/v1/presets/seed-keras", json={"dataset": "uploaded", "seeds": [0]})
    assert uploaded.status_code == 422, uploaded.text
    assert uploaded.json()["errors"][0]["loc"] == ["body", "dataset"]
