"""Deleting, renaming and tagging runs and experiments; aliases refuse runs without a model; what
ended runs say instead of "yet". In-process API on SQLite and on Postgres; runs are trained by
writing what a worker writes, with the worker's own data functions (leases included)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from service.db import get_engine, session_scope
from service.main import create_app
from service.ml.probes import SlotStatistics
from service.ml.training import EpochMetrics
from service.models import (
    EpochMetric,
    LayerStat,
    ModelAlias,
    ModelArtifact,
    Recalibration,
    Run,
    RunCheckpoint,
    RunStatus,
)
from service.runs import repository as run_repo
from tests.conftest import Backend

SPEC = {"name": "tiny", "dataset": {"name": "synthetic", "limit": 200}, "train": {"epochs": 2}}
GRID = {"name": "grid", "base": SPEC, "grid": {"model.norm.kind": ["batch", "none"]}, "seeds": [0, 1]}
PER_RUN_TABLES = (EpochMetric, LayerStat, RunCheckpoint, ModelArtifact, Recalibration)


@pytest.fixture(params=["sqlite", "postgres"])
def client(
    request: pytest.FixtureRequest,
    sqlite_backend: Backend,
    tmp_path: Any,
    use_backend: Callable[[Backend], None],
) -> Iterator[TestClient]:
    if request.param == "sqlite":
        use_backend(sqlite_backend)
    else:
        backend = request.getfixturevalue("postgres_backend")
        use_backend(backend)
    with TestClient(create_app()) as test_client:
        yield test_client
    # Before the fixture drops the database: pooled connections to it would be closed at garbage
    # collection, with a warning.
    get_engine().dispose()


def claim(run_id: str) -> run_repo.Lease:
    with session_scope() as session:
        lease = run_repo.claim_run(session=session, run_id=run_id, worker="test-node/1", time_limit_s=600)
    assert lease is not None
    return lease


def record_epoch(lease: run_repo.Lease, epoch: int) -> None:
    stats = (SlotStatistics(epoch=epoch, layer="bn1", input_mean=0.0, input_std=1.0),)
    metrics = EpochMetrics(epoch, 0.5, 0.8, 0.6, 0.7, 0.1, stats)
    with session_scope() as session:
        run_repo.record_epoch(session=session, lease=lease, metrics=metrics, training_state=b"state" * 100)


def train(client: TestClient, *, status: RunStatus = RunStatus.succeeded, spec: dict[str, Any] = SPEC) -> str:
    """A run as a worker leaves it: epochs, probe statistics, and for a success a model."""
    run_id = str(client.post("/api/v1/runs", json=spec).json()["id"])
    lease = claim(run_id)
    record_epoch(lease, 1)
    with session_scope() as session:
        assert run_repo.finish_held_run(
            session=session, lease=lease, status=status, error="boom" if status == RunStatus.failed else None
        )
        if status == RunStatus.succeeded:
            run_repo.save_artifact(
                session=session, run_id=run_id, weights=b"w", model_config={}, sha256="0" * 64
            )
    return run_id


def rows_of(run_id: str) -> dict[str, int]:
    with session_scope() as session:
        counts = {
            table.__tablename__: session.scalar(
                select(func.count()).select_from(table).where(table.run_id == run_id)
            )
            or 0
            for table in PER_RUN_TABLES
        }
        counts["runs"] = session.scalar(select(func.count()).select_from(Run).where(Run.id == run_id)) or 0
    return counts


NOTHING = {
    "epoch_metrics": 0,
    "layer_stats": 0,
    "run_checkpoints": 0,
    "model_artifacts": 0,
    "recalibrations": 0,
}


def test_delete_a_run_removes_everything_it_stored(client: TestClient) -> None:
    run_id = train(client)
    kept = train(client)
    assert rows_of(run_id)["model_artifacts"] == 1
    response = client.delete(f"/api/v1/runs/{run_id}")
    assert (response.status_code, response.content) == (204, b"")
    assert rows_of(run_id) == NOTHING | {"runs": 0}
    assert client.get(f"/api/v1/runs/{run_id}").status_code == 404
    assert client.delete(f"/api/v1/runs/{run_id}").status_code == 404
    assert rows_of(kept)["model_artifacts"] == 1  # the others stay


def test_deleting_a_running_run_stops_its_worker_from_writing_anything(client: TestClient) -> None:
    run_id = str(client.post("/api/v1/runs", json=SPEC).json()["id"])
    lease = claim(run_id)
    record_epoch(lease, 1)
    assert client.delete(f"/api/v1/runs/{run_id}").status_code == 204
    # The worker, still training, reports its next epoch, checks its signals, and finishes.
    with pytest.raises(run_repo.LeaseLost):
        record_epoch(lease, 2)
    with session_scope() as session:
        assert run_repo.read_signals(session=session, lease=lease).held is False
        assert run_repo.heartbeat(session=session, lease=lease) is False
        assert run_repo.finish_held_run(session=session, lease=lease, status=RunStatus.succeeded) is False
    assert rows_of(run_id) == NOTHING | {"runs": 0}


def test_an_alias_on_a_run_blocks_its_deletion_with_a_409_naming_it(client: TestClient) -> None:
    run_id = train(client)
    assert client.put("/api/v1/models/fashion-bn", json={"run_id": run_id}).status_code == 201
    refused = client.delete(f"/api/v1/runs/{run_id}")
    assert refused.status_code == 409
    assert refused.json() == {
        "detail": f"run {run_id} is served by the alias fashion-bn: point it at another run "
        "(PUT /api/v1/models/fashion-bn) or delete it (DELETE /api/v1/models/fashion-bn) first",
        "errors": [],
    }
    assert rows_of(run_id)["model_artifacts"] == 1  # nothing was deleted
    assert client.delete("/api/v1/models/fashion-bn").status_code == 204
    assert client.delete(f"/api/v1/runs/{run_id}").status_code == 204


def test_delete_an_experiment_with_its_runs(client: TestClient) -> None:
    experiment = client.post("/api/v1/experiments", json=GRID).json()
    run_ids = [run["id"] for run in experiment["runs"]]
    lease = claim(run_ids[0])
    record_epoch(lease, 1)
    other = train(client)
    assert client.delete(f"/api/v1/experiments/{experiment['id']}").status_code == 204
    for run_id in run_ids:
        assert rows_of(run_id) == NOTHING | {"runs": 0}
    assert client.get(f"/api/v1/experiments/{experiment['id']}").status_code == 404
    assert client.delete(f"/api/v1/experiments/{experiment['id']}").status_code == 404
    assert rows_of(other)["runs"] == 1


def test_an_alias_on_an_experiment_or_one_of_its_runs_blocks_its_deletion(client: TestClient) -> None:
    experiment = client.post("/api/v1/experiments", json=GRID).json()
    assert client.put("/api/v1/models/best", json={"experiment_id": experiment["id"]}).status_code == 201
    refused = client.delete(f"/api/v1/experiments/{experiment['id']}")
    assert refused.status_code == 409
    assert "served by the alias best" in refused.json()["detail"]
    with session_scope() as session:
        assert session.scalar(select(func.count()).select_from(Run)) == 4


def test_patch_renames_tags_and_annotates_a_run(client: TestClient) -> None:
    run_id = str(client.post("/api/v1/runs", json=SPEC | {"name": "x" * 200}).json()["id"])
    changed = client.patch(f"/api/v1/runs/{run_id}", json={"name": "fashion-bn", "tags": ["article", "bn"]})
    assert changed.status_code == 200, changed.text
    assert (changed.json()["name"], changed.json()["tags"], changed.json()["notes"]) == (
        "fashion-bn",
        ["article", "bn"],
        None,
    )
    noted = client.patch(f"/api/v1/runs/{run_id}", json={"notes": "BN after the activation."}).json()
    assert (noted["name"], noted["tags"], noted["notes"]) == (
        "fashion-bn",
        ["article", "bn"],
        "BN after the activation.",
    )
    cleared = client.patch(f"/api/v1/runs/{run_id}", json={"name": None, "tags": [], "notes": None}).json()
    assert (cleared["name"], cleared["tags"], cleared["notes"]) == (None, [], None)
    assert client.get(f"/api/v1/runs/{run_id}").json()["tags"] == []
    for bad in ({"name": "a/b"}, {"tags": ["with space"]}, {"status": "succeeded"}, {"tags": ["t"] * 21}):
        assert client.patch(f"/api/v1/runs/{run_id}", json=bad).status_code == 422, bad
    assert client.patch(f"/api/v1/runs/{'0' * 32}", json={"name": "x"}).status_code == 404


def test_patch_an_experiment(client: TestClient) -> None:
    experiment_id = client.post("/api/v1/experiments", json=GRID).json()["id"]
    changed = client.patch(
        f"/api/v1/experiments/{experiment_id}", json={"name": "BN or not", "tags": ["keep"]}
    )
    assert (changed.json()["name"], changed.json()["tags"]) == ("BN or not", ["keep"])
    assert client.get(f"/api/v1/experiments/{experiment_id}").json()["name"] == "BN or not"
    no_name = client.patch(f"/api/v1/experiments/{experiment_id}", json={"name": None})
    assert no_name.status_code == 422
    assert no_name.json()["detail"] == "body field name: Input should be a valid string"


@pytest.mark.parametrize(
    ("status", "reason"),
    [
        (RunStatus.failed, "failed (boom)"),
        (RunStatus.cancelled, "was cancelled before it finished"),
    ],
)
def test_an_alias_refuses_a_run_that_ended_without_a_model(
    client: TestClient, status: RunStatus, reason: str
) -> None:
    run_id = train(client, status=status)
    refused = client.put("/api/v1/models/broken", json={"run_id": run_id})
    assert refused.status_code == 409
    assert refused.json()["detail"] == f"an alias needs a run with a model, and run {run_id} {reason}"
    assert client.get("/api/v1/models/broken").status_code == 404


def test_an_alias_refuses_an_experiment_that_ended_without_a_model(client: TestClient) -> None:
    experiment = client.post("/api/v1/experiments", json=GRID).json()
    client.post(f"/api/v1/experiments/{experiment['id']}/cancel")
    refused = client.put("/api/v1/models/best", json={"experiment_id": experiment["id"]})
    assert refused.status_code == 409
    assert "none of its 4 runs succeeded with a model, and all have ended" in refused.json()["detail"]


def test_ended_runs_say_what_happened_instead_of_yet(client: TestClient) -> None:
    failed = str(client.post("/api/v1/runs", json=SPEC).json()["id"])
    lease = claim(failed)
    with session_scope() as session:
        run_repo.finish_held_run(session=session, lease=lease, status=RunStatus.failed, error="out of memory")
    plot = client.get(f"/api/v1/runs/{failed}/plot.svg").json()["detail"]
    assert plot == f"run {failed} failed (out of memory) before it finished an epoch: it has no " + (
        "finished epoch to plot"
    )
    served = client.get(f"/v2/models/{failed}").json()["error"]
    assert "yet" not in served
    assert f"run {failed} failed (out of memory)" in served
    predicted = client.post(f"/api/v1/runs/{failed}/predict", json={"inputs": [[0.0] * 784]})
    assert predicted.status_code == 409
    assert "yet" not in predicted.json()["detail"]
    assert "failed (out of memory)" in predicted.json()["detail"]
    experiment = client.post("/api/v1/experiments", json=GRID).json()
    assert "yet" in client.get(f"/api/v1/experiments/{experiment['id']}/plot.svg").json()["detail"]
    client.post(f"/api/v1/experiments/{experiment['id']}/cancel")
    ended = client.get(f"/api/v1/experiments/{experiment['id']}/plot.svg").json()["detail"]
    assert ended.endswith("ended (4 cancelled) before finishing an epoch: nothing to plot"), ended


def test_aliases_still_block_nothing_once_deleted(client: TestClient) -> None:
    run_id = train(client)
    client.put("/api/v1/models/a", json={"run_id": run_id})
    client.delete("/api/v1/models/a")
    assert client.delete(f"/api/v1/runs/{run_id}").status_code == 204
    with session_scope() as session:
        assert session.scalar(select(func.count()).select_from(ModelAlias)) == 0


def test_an_epoch_recorded_again_replaces_its_layer_statistics(client: TestClient) -> None:
    """A run resumed after a crash probes its last epochs again (epoch 0 comes with epoch 1)."""
    run_id = str(client.post("/api/v1/runs", json=SPEC).json()["id"])
    lease = claim(run_id)
    for mean in (0.0, 0.5):
        stats = tuple(
            SlotStatistics(epoch=epoch, layer=layer, input_mean=mean, input_std=1.0)
            for epoch in (0, 1)
            for layer in ("bn1", "bn2")
        )
        with session_scope() as session:
            run_repo.record_epoch(
                session=session, lease=lease, metrics=EpochMetrics(1, 0.5, 0.8, 0.6, 0.7, 0.1, stats),
                training_state=None,
            )  # fmt: skip
            session.query(EpochMetric).filter_by(run_id=run_id).delete()  # as resume_point drops it
    with session_scope() as session:
        rows = session.query(LayerStat).filter_by(run_id=run_id).all()
        assert sorted((r.epoch, r.layer, r.input_mean) for r in rows) == [
            (0, "bn1", 0.5), (0, "bn2", 0.5), (1, "bn1", 0.5), (1, "bn2", 0.5)
        ]  # fmt: skip
