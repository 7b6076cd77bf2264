"""The runs and experiments lists' filters, search and sorting, and the CSV downloads (in-process,
on SQLite; no worker: the epochs are written as a worker writes them)."""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.db import session_scope
from service.main import create_app
from service.models import EpochMetric, Run
from tests.conftest import Backend, postgres_backend_at, sqlite_backend_at


@pytest.fixture(params=["sqlite", "postgres"])
def any_client(
    request: pytest.FixtureRequest, tmp_path: Path, use_backend: Callable[[Backend], None]
) -> Iterator[TestClient]:
    """The filters read the JSON spec column: SQLite's JSON and Postgres' JSONB both answer them."""
    with ExitStack() as stack:
        if request.param == "sqlite":
            backend = sqlite_backend_at(tmp_path)
        else:
            backend = stack.enter_context(postgres_backend_at(tmp_path))
        use_backend(backend)
        yield stack.enter_context(TestClient(create_app()))


def submit(client: TestClient, name: str, norm: str = "none", dataset: str = "synthetic") -> str:
    spec = {"name": name, "dataset": {"name": dataset, "limit": 200}, "model": {"norm": {"kind": norm}}}
    response = client.post("/api/v1/runs", json=spec | {"train": {"epochs": 3}})
    assert response.status_code == 202, response.text
    time.sleep(0.01)  # distinct created_at
    return str(response.json()["id"])


def finish(run_id: str, val_losses: list[float]) -> None:
    with session_scope() as session:
        run = session.get(Run, run_id)
        assert run is not None
        for epoch, loss in enumerate(val_losses, start=1):
            session.add(
                EpochMetric(
                    run_id=run_id,
                    epoch=epoch,
                    train_loss=loss + 0.1,
                    train_accuracy=1 - loss,
                    val_loss=loss,
                    val_accuracy=1 - loss / 2,
                    seconds=0.25,
                    train_seconds=0.2,
                    train_samples=160,
                )
            )
        run.epochs_done = len(val_losses)
        run.status = "succeeded"


def diverge(run_id: str) -> None:
    """The run as a worker leaves a diverged one: its first epoch's losses null, the run failed."""
    with session_scope() as session:
        run = session.get(Run, run_id)
        assert run is not None
        session.add(EpochMetric(run_id=run_id, epoch=1, seconds=0.25, train_samples=160))
        run.epochs_done = 1
        run.status = "failed"
        run.error = "diverged: the loss became non-finite at epoch 1"


def ids(page: dict[str, Any]) -> list[str]:
    return [run["id"] for run in page["items"]]


def test_filters_search_and_sort_combine_and_the_total_counts_the_matches(any_client: TestClient) -> None:
    client = any_client
    a = submit(client, "Alpha BN", norm="batch")
    b = submit(client, "beta plain")
    c = submit(client, "gamma BN", norm="batch")
    d = submit(client, "delta mnist1d", dataset="mnist1d")
    finish(a, [0.9, 0.5])
    finish(b, [0.8, 0.3])
    finish(c, [0.7])

    def get(**params: str | int) -> dict[str, Any]:
        body: dict[str, Any] = client.get("/api/v1/runs", params=params).json()
        return body

    assert ids(get()) == [d, c, b, a]  # unchanged default: newest first
    assert ids(get(norm="batch")) == [c, a]
    assert ids(get(dataset="mnist1d")) == [d]
    assert ids(get(q="bn")) == [c, a]  # any case
    assert ids(get(q=b[:8])) == [b]  # an id prefix
    assert ids(get(name="ALPHA")) == [a]
    assert ids(get(sort="val_loss")) == [b, a, c, d]  # lowest last-epoch loss first, no metric last
    assert ids(get(sort="val_loss", order="desc")) == [c, a, b, d]
    assert ids(get(sort="val_accuracy")) == [b, a, c, d]  # accuracies: highest first by default
    assert ids(get(sort="name")) == [a, b, d, c]
    page = get(sort="val_loss", norm="batch", limit=1, offset=1)
    assert (ids(page), page["total"]) == ([c], 2)
    run = client.get(f"/api/v1/runs/{a}").json()
    assert run["experiment_id"] is None
    assert run["summary"]["val_loss"] == 0.5
    # A page's summaries (their last epochs read in one query) are each run's own.
    listed = {item["id"]: item["summary"] for item in get()["items"]}
    assert listed == {r: client.get(f"/api/v1/runs/{r}").json()["summary"] for r in (a, b, c, d)}
    assert (listed[a]["val_loss"], listed[b]["val_loss"], listed[d]["val_loss"]) == (0.5, 0.3, None)
    # Tags (set by PATCH): exact matches only, `_` is no wildcard, other tags do not count.
    assert client.patch(f"/api/v1/runs/{a}", json={"tags": ["baseline", "lr_high"]}).status_code == 200
    assert client.patch(f"/api/v1/runs/{b}", json={"tags": ["baseline2", "lrXhigh"]}).status_code == 200
    assert ids(get(tag="baseline")) == [a]
    assert ids(get(tag="lr_high")) == [a]
    assert ids(get(tag="base")) == []


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"sort": "lr"}, "sort"),
        ({"order": "up"}, "order"),
        ({"norm": "batchy"}, "norm"),
        ({"dataset": "imagenet"}, "dataset"),
        ({"q": ""}, "q"),
        ({"tag": "two words"}, "tag"),
    ],
)
def test_an_unknown_sort_key_or_filter_value_is_a_422_naming_it(
    client: TestClient, params: dict[str, str], field: str
) -> None:
    response = client.get("/api/v1/runs", params=params)
    assert response.status_code == 422
    assert field in response.text


def test_metrics_csv_and_format_csv_are_the_same_table(client: TestClient) -> None:
    run_id = submit(client, "csv")
    finish(run_id, [0.9, 0.4])
    response = client.get(f"/api/v1/runs/{run_id}/metrics.csv")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/csv")
    assert f'filename="{run_id}-metrics.csv"' in response.headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert rows[1] | {} == {
        "run_id": run_id,
        "epoch": "2",
        "train_loss": "0.5",
        "train_accuracy": "0.6",
        "val_loss": "0.4",
        "val_accuracy": "0.8",
        "seconds": "0.25",
        "train_seconds": "0.2",
        "train_samples": "160",
    }
    assert client.get(f"/api/v1/runs/{run_id}/metrics", params={"format": "csv"}).text == response.text
    assert (
        client.get(f"/api/v1/runs/{run_id}/metrics", params={"format": "json"}).json()["epochs"][1]["epoch"]
        == 2
    )
    assert client.get(f"/api/v1/runs/{run_id}/metrics", params={"format": "xml"}).status_code == 422
    assert client.get(f"/api/v1/runs/{'0' * 32}/metrics.csv").status_code == 404


EXPERIMENT = {
    "name": "csv grid",
    "base": {"dataset": {"name": "synthetic", "limit": 200}, "train": {"epochs": 2}},
    "grid": {"model.norm.kind": ["none", "batch"]},
    "seeds": [0, 1],
}


def test_experiment_csvs_and_the_experiments_list_search(client: TestClient) -> None:
    body = client.post("/api/v1/experiments", json=EXPERIMENT).json()
    other = client.post("/api/v1/experiments", json=EXPERIMENT | {"name": "Another one"}).json()
    for r in body["runs"]:
        finish(r["id"], [0.8, 0.4 + 0.1 * r["seed"]])
    metrics = list(
        csv.DictReader(io.StringIO(client.get(f"/api/v1/experiments/{body['id']}/metrics.csv").text))
    )
    assert len(metrics) == 4 * 2
    assert {(m["config"], m["seed"]) for m in metrics} == {
        ("norm=none", "0"), ("norm=none", "1"), ("norm=batch", "0"), ("norm=batch", "1")
    }  # fmt: skip
    report = client.get(f"/api/v1/experiments/{body['id']}/report.csv")
    assert report.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(report.text)))
    assert [r["config"] for r in rows] == ["norm=none", "norm=batch"]
    assert float(rows[0]["final_val_loss_mean"]) == pytest.approx(0.45)
    assert float(rows[0]["final_val_loss_std"]) == pytest.approx(0.0707107, rel=1e-5)
    same = client.get(f"/api/v1/experiments/{body['id']}/report", params={"format": "csv"}).text
    assert same == report.text
    assert client.get(f"/api/v1/experiments/{body['id']}/report", params={"format": "pdf"}).status_code == 422

    def listing(**params: str) -> list[str]:
        return [e["id"] for e in client.get("/api/v1/experiments", params=params).json()["items"]]

    assert listing() == [other["id"], body["id"]]
    assert listing(q="another") == [other["id"]]
    assert listing(sort="name") == [other["id"], body["id"]]  # A before c
    assert listing(sort="name", order="desc") == [body["id"], other["id"]]
    runs = client.get("/api/v1/runs", params={"experiment_id": body["id"], "limit": 100}).json()
    assert runs["total"] == 4
    assert client.get("/api/v1/runs", params={"in_experiment": "true"}).json()["total"] == 8
    assert client.get("/api/v1/runs", params={"in_experiment": "false"}).json()["total"] == 0
    assert {r["experiment_id"] for r in runs["items"]} == {body["id"]}
    assert client.get("/api/v1/experiments", params={"sort": "runs"}).status_code == 422


def test_the_report_csv_counts_the_diverged_runs_after_the_failed(client: TestClient) -> None:
    body = client.post("/api/v1/experiments", json=EXPERIMENT).json()
    for r in body["runs"]:
        if r["config"] == "norm=none" and r["seed"] == 1:
            diverge(r["id"])
        else:
            finish(r["id"], [0.8, 0.4])
    report = client.get(f"/api/v1/experiments/{body['id']}/report.csv").text
    header = report.splitlines()[0].split(",")
    assert header[header.index("failed") + 1] == "diverged"
    rows = {r["config"]: r for r in csv.DictReader(io.StringIO(report))}
    assert (rows["norm=none"]["failed"], rows["norm=none"]["diverged"]) == ("1", "1")
    assert (rows["norm=batch"]["failed"], rows["norm=batch"]["diverged"]) == ("0", "0")
