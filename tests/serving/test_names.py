"""What a served name means is read once and reused (no database trip per request): this process's
own changes apply at once, another process's within BNLAB_SERVE_NAME_CACHE_MS."""

from __future__ import annotations

import time

from fastapi.testclient import TestClient
from sqlalchemy import text

from service.db import get_engine, session_scope
from service.serving import repository as model_repo
from service.serving.server import NAMING, NameCache, get_model_server

INFER = {"inputs": [{"name": "input", "shape": [1, 784], "datatype": "FP32", "data": [0.5] * 784}]}


def served_run(client: TestClient, name: str) -> str:
    answer = client.post(f"/v2/models/{name}/infer", json=INFER)
    assert answer.status_code == 200, answer.text
    return str(answer.json()["parameters"]["run_id"])


def test_a_change_from_another_process_is_seen_once_the_reused_name_expires(
    client: TestClient, bn_run: str, no_bn_run: str
) -> None:
    assert client.put("/api/v1/models/prod", json={"run_id": bn_run}).status_code == 201
    assert served_run(client, "prod") == bn_run
    # As another process would: straight to the database, past this process's sessions.
    with get_engine().begin() as connection:
        connection.execute(
            text("UPDATE model_aliases SET run_id = :run WHERE name = 'prod'"), {"run": no_bn_run}
        )
    assert served_run(client, "prod") == bn_run  # reused: no database trip for this request
    time.sleep(get_model_server().names.ttl_s + 0.05)
    assert served_run(client, "prod") == no_bn_run


def test_this_process_commits_drop_reused_names_at_once(
    client: TestClient, bn_run: str, no_bn_run: str
) -> None:
    assert client.put("/api/v1/models/prod", json={"run_id": bn_run}).status_code == 201
    assert served_run(client, "prod") == bn_run
    with session_scope() as session:  # not through a route: any session of this process
        model_repo.put_alias(session=session, name="prod", run_id=no_bn_run, version=None)
    assert served_run(client, "prod") == no_bn_run
    assert client.delete("/api/v1/models/prod").status_code == 204
    assert client.post("/v2/models/prod/infer", json=INFER).status_code == 404


def test_a_lookup_that_began_before_a_commit_is_not_reused(client: TestClient, bn_run: str) -> None:
    with session_scope() as session:
        resolved = model_repo.resolve_model(session=session, name=bn_run, version=None)
    names = NameCache(ttl_s=60)
    began = NAMING.value
    assert client.put("/api/v1/models/other", json={"run_id": bn_run}).status_code == 201  # a commit
    names.put(resolved, None, began)
    assert names.get(bn_run, None) is None
    names.put(resolved, None, NAMING.value)
    assert names.get(bn_run, None) == resolved


def test_statistics_and_readiness_lookups_never_wait_for_a_writer(client: TestClient, bn_run: str) -> None:
    # They only read: on SQLite a read-only session takes no write lock, so a worker's open write
    # (here: this session's) does not hold them up to the busy timeout (15 s, then a 503).
    assert client.put("/api/v1/models/prod", json={"run_id": bn_run}).status_code == 201
    with session_scope() as writer:
        writer.execute(text("UPDATE model_aliases SET version = NULL WHERE name = 'nobody'"))  # lock taken
        started = time.monotonic()
        assert client.get("/v2/models/prod/stats").status_code == 200
        assert client.get(f"/v2/models/{bn_run}/versions/1/stats").status_code == 200
        assert client.get("/v2/models/nobody/stats").status_code == 404
        assert client.get("/v2/models/nobody/ready").status_code == 404
        assert time.monotonic() - started < 5
