"""/api/v1/models aliases: names for runs (optionally pinned to a version), usable on /v2."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient

from service.db import session_scope
from service.ml import checkpoints
from service.models import EpochMetric, Run
from service.runs import repository as run_repo
from service.runs.schemas import RunCreate
from tests.serving.conftest import BN_SPEC, _trained_weights

INFER = {"inputs": [{"name": "input", "shape": [1, 784], "datatype": "FP32", "data": [0.5] * 784}]}


def test_alias_lifecycle(client: TestClient, bn_run: str, no_bn_run: str) -> None:
    created = client.put("/api/v1/models/fashion-bn", json={"run_id": bn_run})
    assert created.status_code == 201, created.text
    assert created.headers["location"] == "/api/v1/models/fashion-bn"
    assert created.json() | {"created_at": None, "updated_at": None} == {
        "name": "fashion-bn",
        "run_id": bn_run,
        "version": None,
        "serves_version": 1,
        "experiment_id": None,
        "metric": None,
        "metric_value": None,
        "created_at": None,
        "updated_at": None,
    }
    infer = client.post("/v2/models/fashion-bn/infer", json=INFER).json()
    assert (infer["model_name"], infer["parameters"]["run_id"]) == ("fashion-bn", bn_run)

    repointed = client.put("/api/v1/models/fashion-bn", json={"run_id": no_bn_run})
    assert repointed.status_code == 200
    assert client.get("/api/v1/models/fashion-bn").json()["run_id"] == no_bn_run
    assert client.post("/v2/models/fashion-bn/infer", json=INFER).json()["parameters"]["run_id"] == no_bn_run

    client.put("/api/v1/models/another", json={"run_id": bn_run})
    assert [a["name"] for a in client.get("/api/v1/models").json()["items"]] == ["another", "fashion-bn"]
    assert client.delete("/api/v1/models/fashion-bn").status_code == 204
    assert client.get("/api/v1/models/fashion-bn").status_code == 404
    assert client.delete("/api/v1/models/fashion-bn").status_code == 404
    assert client.post("/v2/models/fashion-bn/infer", json=INFER).status_code == 404
    assert client.get(f"/api/v1/runs/{bn_run}").status_code == 200  # the run stays


def test_stats_is_reserved_for_tritons_statistics_route(client: TestClient, bn_run: str) -> None:
    # /v2/models/stats is every model's statistics: a model named `stats` could never be reached.
    refused = client.put("/api/v1/models/stats", json={"run_id": bn_run})
    assert refused.status_code == 422
    assert refused.json()["detail"] == (
        "an alias cannot be named 'stats': it is reserved for Triton's statistics route, GET /v2/models/stats"
    )
    assert client.get("/api/v1/models/stats").status_code == 404  # nothing half-written
    assert client.put("/api/v1/models/stats-bn", json={"run_id": bn_run}).status_code == 201


def test_pinned_alias_keeps_its_version_while_a_free_one_follows_the_newest(
    client: TestClient, bn_run: str
) -> None:
    client.put("/api/v1/models/pinned", json={"run_id": bn_run, "version": 1})
    client.put("/api/v1/models/newest", json={"run_id": bn_run})
    assert client.post(f"/api/v1/runs/{bn_run}/recalibrate", json={"num_batches": 5}).status_code == 201
    assert client.get("/api/v1/models/pinned").json()["serves_version"] == 1
    assert client.get("/api/v1/models/newest").json()["serves_version"] == 2
    assert client.post("/v2/models/pinned/infer", json=INFER).json()["model_version"] == "1"
    assert client.post("/v2/models/newest/infer", json=INFER).json()["model_version"] == "2"
    assert client.post("/v2/models/pinned/versions/2/infer", json=INFER).json()["model_version"] == "2"


def test_alias_refusals(client: TestClient, bn_run: str) -> None:
    assert client.put("/api/v1/models/x", json={"run_id": "0" * 32}).status_code == 404  # no such run
    missing_version = client.put("/api/v1/models/x", json={"run_id": bn_run, "version": 5})
    assert missing_version.status_code == 404
    assert "no model version 5" in missing_version.json()["detail"]
    assert client.put("/api/v1/models/x", json={"run_id": bn_run, "experiment": "e1"}).status_code == 422
    assert client.put("/api/v1/models/x", json={"run_id": "../../etc"}).status_code == 422
    for name in ("a" * 32, "abcdef0123456789abcdef0123456789", "-dash", "a" * 65, "a%2Fb", "a.b%20c"):
        assert client.put(f"/api/v1/models/{name}", json={"run_id": bn_run}).status_code in (404, 422), name
    assert client.put("/api/v1/models/a.b-c_1", json={"run_id": bn_run}).status_code == 201
    queued = client.post("/api/v1/runs", json={"dataset": {"name": "synthetic", "limit": 200}}).json()["id"]
    early = client.put("/api/v1/models/early", json={"run_id": queued})
    assert early.status_code == 409  # no model to serve: name it once it has succeeded
    assert early.json()["detail"] == (
        f"an alias needs a run with a model, and run {queued} is queued; it gets a model if it succeeds"
    )


def finish_run(run_id: str, *, val_accuracy: float, val_loss: float, model: bool = True) -> None:
    """What a worker stores when a run succeeds: its epochs' metrics and (normally) its model."""
    with session_scope() as session:
        run = session.get(Run, run_id)
        assert run is not None
        spec = RunCreate.model_validate(run.spec)
        for epoch in range(1, spec.train.epochs + 1):
            last = epoch == spec.train.epochs
            session.add(
                EpochMetric(
                    run_id=run_id,
                    epoch=epoch,
                    train_loss=0.5,
                    train_accuracy=0.8,
                    val_loss=val_loss if last else 9.0,
                    val_accuracy=val_accuracy if last else 0.0,
                    seconds=0.1,
                )
            )
        run.epochs_done, run.status = spec.train.epochs, "succeeded"
        if model:
            weights, config = _trained_weights(spec.model_dump_json())
            run_repo.save_artifact(
                session=session,
                run_id=run_id,
                weights=weights,
                model_config=config,
                sha256=checkpoints.sha256_hex(weights),
            )


def experiment(client: TestClient) -> dict[str, Any]:
    body = {"name": "alias", "base": BN_SPEC, "grid": {"model.norm.kind": ["none", "batch"]}, "seeds": [0, 1]}
    response = client.post("/api/v1/experiments", json=body)
    assert response.status_code == 202, response.text
    return response.json()


def test_an_experiment_alias_serves_its_best_run_and_follows_it_as_runs_finish(client: TestClient) -> None:
    exp = experiment(client)
    a, b, c, d = (r["id"] for r in exp["runs"])
    created = client.put("/api/v1/models/best", json={"experiment_id": exp["id"]})
    assert created.status_code == 201, created.text
    assert created.json() | {"created_at": None, "updated_at": None} == {
        "name": "best",
        "run_id": None,
        "version": None,
        "serves_version": None,
        "experiment_id": exp["id"],
        "metric": "val_accuracy",
        "metric_value": None,
        "created_at": None,
        "updated_at": None,
    }
    early = client.post("/v2/models/best/infer", json=INFER)
    assert early.status_code == 409
    assert "none of its runs has succeeded" in early.json()["error"]
    assert client.get("/v2/models/best/ready").status_code == 400

    finish_run(a, val_accuracy=0.70, val_loss=0.9)
    finish_run(c, val_accuracy=0.99, val_loss=0.1, model=False)  # no stored model: never served
    assert client.get("/api/v1/models/best").json()["run_id"] == a
    assert client.post("/v2/models/best/infer", json=INFER).json()["parameters"]["run_id"] == a

    finish_run(b, val_accuracy=0.80, val_loss=0.95)
    now = client.get("/api/v1/models/best").json()
    assert (now["run_id"], now["serves_version"], now["metric_value"]) == (b, 1, 0.80)
    assert client.post("/v2/models/best/infer", json=INFER).json()["parameters"]["run_id"] == b
    assert client.get("/v2/models/best/ready").json() == {"name": "best", "ready": True}

    by_loss = client.put("/api/v1/models/best", json={"experiment_id": exp["id"], "metric": "val_loss"})
    assert by_loss.status_code == 200
    assert (by_loss.json()["run_id"], by_loss.json()["metric_value"]) == (a, 0.9)  # the lowest loss
    assert client.post("/v2/models/best/infer", json=INFER).json()["parameters"]["run_id"] == a
    with session_scope() as session:  # a running run never qualifies, whatever its metrics say
        running = session.get(Run, d)
        assert running is not None
        running.status = "running"
    assert client.get("/api/v1/models/best").json()["run_id"] == a

    assert client.put("/api/v1/models/best", json={"run_id": b}).json()["experiment_id"] is None
    assert client.post("/v2/models/best/infer", json=INFER).json()["parameters"]["run_id"] == b


def test_experiment_alias_refusals(client: TestClient, bn_run: str) -> None:
    exp_id = experiment(client)["id"]
    unknown = client.put("/api/v1/models/x", json={"experiment_id": "0" * 32})
    assert unknown.status_code == 404
    assert "experiment" in unknown.json()["detail"]
    for body in (
        {},
        {"run_id": bn_run, "experiment_id": exp_id},
        {"experiment_id": exp_id, "version": 1},
        {"run_id": bn_run, "metric": "val_loss"},
        {"experiment_id": exp_id, "metric": "seconds"},
        {"experiment_id": "../../etc"},
    ):
        assert client.put("/api/v1/models/x", json=body).status_code == 422, body
    assert client.get("/api/v1/models/x").status_code == 404
