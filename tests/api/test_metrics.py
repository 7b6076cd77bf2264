"""GET /metrics (Prometheus), request ids and JSON logs, against the in-process API on real SQLite."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from service.auth import create_key
from service.db import session_scope
from service.main import create_app
from service.ml.training import EpochMetrics
from service.runs import repository as run_repo
from service.runs.schemas import RunCreate
from service.telemetry import JsonFormatter, run_context
from tests.conftest import Backend
from tests.serving.conftest import BN_SPEC, store_trained_run

SPEC = {"dataset": {"name": "synthetic", "limit": 1000, "val_split": 0.2}, "train": {"epochs": 5}}


def scrape(client: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def running_run_with_epochs(seconds: list[float]) -> str:
    with session_scope() as session:
        run_id = run_repo.create_run(session=session, spec=RunCreate.model_validate(SPEC)).id
        lease = run_repo.claim_run(session=session, run_id=run_id, worker="test/1", time_limit_s=60)
        assert lease is not None
    for epoch, duration in enumerate(seconds, start=1):
        with session_scope() as session:
            metrics = EpochMetrics(epoch, 0.5, 0.8, 0.6, 0.7, duration)
            run_repo.record_epoch(
                session=session, lease=lease, metrics=metrics, training_state=b"s", train_samples=800
            )
    return run_id


def test_runs_by_status_queue_depth_epoch_durations_and_samples_per_second(client: TestClient) -> None:
    with session_scope() as session:
        for _ in range(2):
            run_repo.create_run(session=session, spec=RunCreate.model_validate(SPEC))
    run_id = running_run_with_epochs([0.2, 0.8, 3.0])
    samples = scrape(client)
    assert samples[("bnlab_runs", (("status", "queued"),))] == 2
    assert samples[("bnlab_runs", (("status", "running"),))] == 1
    assert samples[("bnlab_runs", (("status", "succeeded"),))] == 0
    assert samples[("bnlab_queue_depth", ())] == 2
    bucket = {
        le: samples[("bnlab_epoch_duration_seconds_bucket", (("le", le),))] for le in ("0.25", "1.0", "+Inf")
    }
    assert bucket == {"0.25": 1, "1.0": 2, "+Inf": 3}
    assert samples[("bnlab_epoch_duration_seconds_count", ())] == 3
    assert samples[("bnlab_epoch_duration_seconds_sum", ())] == pytest.approx(4.0)
    # The worker recorded 800 training samples for the last epoch, which took 3.0 s.
    throughput = samples[("bnlab_training_samples_per_second", (("run_id", run_id),))]
    assert throughput == pytest.approx(800 / 3.0)


def test_errors_are_counted_per_route_template(client: TestClient) -> None:
    before = scrape(client)
    for _ in range(3):
        assert client.get(f"/api/v1/runs/{'a' * 32}").status_code == 404
    assert client.post("/api/v1/runs", json={"train": {"epochs": 0}}).status_code == 422
    after = scrape(client)
    key = (
        "bnlab_http_errors_total",
        (("method", "GET"), ("route", "/api/v1/runs/{run_id}"), ("status", "404")),
    )
    assert after[key] - before.get(key, 0) == 3
    key = ("bnlab_http_errors_total", (("method", "POST"), ("route", "/api/v1/runs"), ("status", "422")))
    assert after[key] - before.get(key, 0) == 1


def test_inference_requests_latency_and_batch_sizes_per_model(client: TestClient) -> None:
    run_id = store_trained_run(BN_SPEC)
    before = scrape(client)
    for _ in range(2):
        answer = client.post(f"/api/v1/runs/{run_id}/predict", json={"inputs": [[0.5] * 784]})
        assert answer.status_code == 200
    assert client.post(f"/api/v1/runs/{run_id}/predict", json={"inputs": [[0.5] * 3]}).status_code == 422
    after = scrape(client)

    def grew(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after[key] - before.get(key, 0)

    assert grew("bnlab_inference_requests_total", model=run_id, outcome="ok") == 2
    assert grew("bnlab_inference_requests_total", model=run_id, outcome="error") == 1
    assert grew("bnlab_inference_latency_seconds_count", model=run_id) == 2
    assert grew("bnlab_inference_batch_requests_count", model=run_id) == 3
    assert grew("bnlab_inference_batch_requests_bucket", model=run_id, le="1.0") == 3
    # An unknown model is counted under one label, never under the name the client sent.
    assert client.post(f"/api/v1/runs/{'b' * 32}/predict", json={"inputs": [[0.5] * 784]}).status_code == 404
    assert (
        scrape(client)[("bnlab_inference_requests_total", (("model", "unresolved"), ("outcome", "error")))]
        >= 1
    )


def test_request_ids_are_echoed_or_made_and_logged_as_json(client: TestClient) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    access = logging.getLogger("bnlab.access")
    access.addHandler(handler)
    access.setLevel(logging.INFO)
    try:
        echoed = client.get("/health/live", headers={"X-Request-ID": "trace-42.a"})
        made = client.get("/health/live", headers={"X-Request-ID": "no spaces; or/slashes"})
    finally:
        access.removeHandler(handler)
    assert echoed.headers["x-request-id"] == "trace-42.a"
    assert len(made.headers["x-request-id"]) == 32
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["request_id"] for line in lines] == ["trace-42.a", made.headers["x-request-id"]]
    assert lines[0]["message"] == "GET /health/live 200"
    assert lines[0]["status"] == 200
    assert lines[0]["level"] == "info"
    assert lines[0]["duration_ms"] >= 0


def test_a_log_line_written_inside_a_run_context_carries_the_run_id() -> None:
    record = logging.LogRecord("service.runs.runner", logging.INFO, __file__, 1, "epoch %d done", (3,), None)
    with run_context("f" * 32):
        line = json.loads(JsonFormatter().format(record))
    assert line["run_id"] == "f" * 32
    assert line["message"] == "epoch 3 done"
    assert "run_id" not in json.loads(JsonFormatter().format(record))


def test_metrics_need_the_read_scope_when_keys_are_on(
    tmp_path: Path, use_backend: Callable[[Backend], None], sqlite_backend: Backend
) -> None:
    keys_file = tmp_path / "keys.txt"
    reader = create_key(keys_file, scopes="read", name="prometheus")
    use_backend(Backend("sqlite", sqlite_backend.env | {"BNLAB_API_KEYS_FILE": str(keys_file)}))
    with TestClient(create_app()) as keyed:
        assert keyed.get("/metrics").status_code == 401
        assert keyed.get("/metrics", headers={"Authorization": f"Bearer {reader}"}).status_code == 200
