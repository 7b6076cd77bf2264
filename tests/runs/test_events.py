"""GET /api/v1/runs/{id}/events: Server-Sent Events from the database, resumable with Last-Event-ID.

The in-process tests move a run through its states with the worker's own data functions (claim,
record an epoch, finish), on a real SQLite database; tests/client and tests/browser follow runs that a
real worker trains through the real API process.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient

from service.client.http import Event, parse_sse
from service.db import get_engine, session_scope
from service.ml.training import EpochMetrics
from service.models import RunStatus
from service.runs import repository as run_repo
from service.runs.events import (
    MIN_POLL_S,
    POLL_BUDGET_PER_S,
    Cursor,
    OpenStreams,
    Snapshot,
    events_for,
    poll_interval,
)
from service.runs.schemas import RunCreate

SPEC = {"name": "sse", "dataset": {"name": "synthetic", "limit": 200}, "train": {"epochs": 3}}


def new_run() -> str:
    with session_scope() as session:
        return run_repo.create_run(session=session, spec=RunCreate.model_validate(SPEC)).id


def claim(run_id: str) -> run_repo.Lease:
    with session_scope() as session:
        lease = run_repo.claim_run(session=session, run_id=run_id, worker="test/1", time_limit_s=60)
    assert lease is not None
    return lease


def record(lease: run_repo.Lease, epoch: int) -> None:
    metrics = EpochMetrics(epoch, 1.0 / epoch, 0.5 + epoch / 10, 1.1 / epoch, 0.4 + epoch / 10, 0.25)
    with session_scope() as session:
        run_repo.record_epoch(session=session, lease=lease, metrics=metrics, training_state=b"state")


def finish(lease: run_repo.Lease, status: RunStatus = RunStatus.succeeded, error: str | None = None) -> None:
    with session_scope() as session:
        assert run_repo.finish_held_run(session=session, lease=lease, status=status, error=error)


def read_events(client: TestClient, run_id: str, last_event_id: str | None = None) -> list[Event]:
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    with client.stream("GET", f"/api/v1/runs/{run_id}/events", headers=headers) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        return list(parse_sse(response.iter_lines()))


def summary(events: list[Event]) -> list[tuple[str | None, str, object]]:
    return [(e.id, e.type, e.data.get("status", e.data.get("epoch"))) for e in events]


def test_a_finished_run_replays_its_epochs_then_its_end_and_the_stream_closes(client: TestClient) -> None:
    run_id = new_run()
    lease = claim(run_id)
    for epoch in (1, 2, 3):
        record(lease, epoch)
    finish(lease)
    events = read_events(client, run_id)
    assert summary(events) == [
        ("1:", "epoch", 1),
        ("2:", "epoch", 2),
        ("3:", "epoch", 3),
        ("3:succeeded", "status", "succeeded"),
    ]
    metrics = client.get(f"/api/v1/runs/{run_id}/metrics").json()["epochs"]
    assert [e.data for e in events[:3]] == [row | {"epochs_total": 3} for row in metrics]
    assert events[-1].data == {"status": "succeeded", "error": None, "epochs_done": 3, "epochs_total": 3}


@pytest.mark.parametrize(
    ("last_event_id", "expected"),
    [
        ("1:", [("2:", "epoch", 2), ("3:", "epoch", 3), ("3:failed", "status", "failed")]),
        ("3:", [("3:failed", "status", "failed")]),
        ("3:failed", []),
        ("0:running", [
            ("1:running", "epoch", 1), ("2:running", "epoch", 2), ("3:running", "epoch", 3),
            ("3:failed", "status", "failed"),
        ]),
    ],
)  # fmt: skip
def test_last_event_id_resumes_exactly_after_that_event(
    client: TestClient, last_event_id: str, expected: list[tuple[str, str, object]]
) -> None:
    run_id = new_run()
    lease = claim(run_id)
    for epoch in (1, 2, 3):
        record(lease, epoch)
    finish(lease, RunStatus.failed, "boom")
    assert summary(read_events(client, run_id, last_event_id)) == expected


def test_a_live_run_streams_each_change_as_it_is_written_without_holding_a_connection(
    client: TestClient,
) -> None:
    run_id = new_run()
    seen: list[Event] = []
    pool_checked_out: list[int] = []

    def worker() -> None:
        # Each step waits until the stream has shown the previous one, so the stream sees every state.
        wait_for(lambda: len(seen) >= 1)
        for _ in range(20):  # a poll takes a millisecond or so of each 0.1 s: it may be caught a few times
            pool_checked_out.append(get_engine().pool.checkedout())  # type: ignore[attr-defined]
            time.sleep(0.05)
        lease = claim(run_id)
        wait_for(lambda: len(seen) >= 2)
        record(lease, 1)
        wait_for(lambda: len(seen) >= 3)
        record(lease, 2)
        finish(lease, RunStatus.cancelled)

    thread = threading.Thread(target=worker)
    thread.start()
    with client.stream("GET", f"/api/v1/runs/{run_id}/events") as response:
        for event in parse_sse(response.iter_lines()):
            seen.append(event)
    thread.join(timeout=10)
    assert summary(seen) == [
        ("0:queued", "status", "queued"),
        ("0:running", "status", "running"),
        ("1:running", "epoch", 1),
        ("2:running", "epoch", 2),
        ("2:cancelled", "status", "cancelled"),
    ]
    # While the stream waited between polls, no database connection was checked out for it.
    assert pool_checked_out.count(0) >= 14, pool_checked_out
    assert OpenStreams.count == 0  # the closed stream no longer slows the others' polls


def test_streams_poll_every_tenth_of_a_second_until_their_polls_would_pass_the_budget() -> None:
    assert poll_interval(1) == poll_interval(25) == MIN_POLL_S == 0.1
    assert poll_interval(128) == 0.5
    assert poll_interval(256) == 1.0  # the default cap on open streams
    for streams in (1, 25, 26, 100, 256, 1000):
        assert streams / poll_interval(streams) <= POLL_BUDGET_PER_S  # polls a second, all streams


def wait_for(condition: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_unknown_run_is_404_and_a_malformed_last_event_id_is_422(client: TestClient) -> None:
    missing = client.get(f"/api/v1/runs/{'0' * 32}/events")
    assert missing.status_code == 404
    assert missing.json()["detail"] == f"run {'0' * 32} not found"
    run_id = new_run()
    for bad in ("x", "3", "-1:running", "1:exploded", "1:running\nevent: x"):
        response = client.get(f"/api/v1/runs/{run_id}/events", headers={"Last-Event-ID": bad})
        assert response.status_code == 422, bad
        assert "Last-Event-ID" in response.text


def test_live_status_comes_before_its_epochs_and_a_final_one_after_them() -> None:
    epochs = [{"epoch": 1, "val_loss": 0.5}, {"epoch": 2, "val_loss": 0.4}]
    cursor = Cursor()

    def event_id() -> str:
        return f"{cursor.epoch}:{cursor.status}"

    running = events_for(Snapshot("running", None, 2, epochs[:1]), cursor, event_id)
    assert [line.split("\n")[1] for line in running] == ["event: status", "event: epoch"]
    assert event_id() == "1:running"
    done = events_for(Snapshot("succeeded", None, 2, epochs[1:]), cursor, event_id)
    assert [line.split("\n")[:2] for line in done] == [
        ["id: 2:running", "event: epoch"],
        ["id: 2:succeeded", "event: status"],
    ]
    assert events_for(Snapshot("succeeded", None, 2, []), cursor, event_id) == []


# ---------------------------------------------------------------------------------------- experiments

EXPERIMENT = {
    "name": "sse-grid",
    "base": {"dataset": {"name": "synthetic", "limit": 200}, "train": {"epochs": 2}},
    "grid": {"model.norm.kind": ["none", "batch"]},
    "seeds": [0],
}


def new_experiment(client: TestClient) -> tuple[str, list[str]]:
    created = client.post("/api/v1/experiments", json=EXPERIMENT)
    assert created.status_code == 202, created.text
    body = created.json()
    return body["id"], [run["id"] for run in body["runs"]]


def read_experiment_events(client: TestClient, experiment_id: str, last: str | None = None) -> list[Event]:
    headers = {"Last-Event-ID": last} if last else {}
    with client.stream("GET", f"/api/v1/experiments/{experiment_id}/events", headers=headers) as response:
        assert response.status_code == 200, response.read()
        return list(parse_sse(response.iter_lines()))


def test_an_experiment_streams_every_run_then_ends_and_resumes_exactly(client: TestClient) -> None:
    experiment_id, (first, second) = new_experiment(client)
    one, two = claim(first), claim(second)
    record(one, 1)
    record(two, 1)
    record(one, 2)
    finish(one)
    finish(two, RunStatus.failed, "diverged")
    events = read_experiment_events(client, experiment_id)
    seen = [(e.id, e.type, e.data.get("run_id"), e.data.get("epoch", e.data.get("status"))) for e in events]
    # Runs that have ended before the stream opened: their epochs, then their final status.
    assert seen == [
        ("1-.0-", "epoch", first, 1),
        ("2-.0-", "epoch", first, 2),
        ("2s.0-", "status", first, "succeeded"),
        ("2s.1-", "epoch", second, 1),
        ("2s.1f", "status", second, "failed"),
        ("2s.1f!", "end", None, None),
    ]
    assert events[1].data["config"] == "norm=none"
    assert events[-1].data["status_counts"]["succeeded"] == 1
    assert events[-2].data["error"] == "diverged"
    # Resuming from any event gives exactly the events after it.
    for i, event in enumerate(events):
        rest = read_experiment_events(client, experiment_id, event.id)
        assert [e.id for e in rest] == [e.id for e in events[i + 1 :]], event.id


def test_an_experiment_cursor_must_match_its_runs(client: TestClient) -> None:
    experiment_id, _ = new_experiment(client)
    response = client.get(f"/api/v1/experiments/{experiment_id}/events", headers={"Last-Event-ID": "1r"})
    assert response.status_code == 422
    assert response.json()["detail"] == "Last-Event-ID has 1 run cursors; this experiment has 2 runs"
    assert client.get(f"/api/v1/experiments/{'0' * 32}/events").status_code == 404
