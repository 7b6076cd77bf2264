"""/api/v1/models aliases: names for runs (optionally pinned to a version), usable on /v2."""

from __future__ import annotations

from fastapi.testclient import TestClient

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
    assert early.status_code == 201
    assert early.json()["serves_version"] is None  # named before it trained: serves once it has
