"""Broker drills on a Redis server of the drill's own: down at submit, restarted with queued runs,
and a pickled message pushed straight into the queue."""

from __future__ import annotations

import pickle
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from kombu import Connection, Exchange, Producer, Queue

from tests.conftest import Backend, postgres_backend_at
from tests.drills.cluster import Cluster, RedisServer, cluster, own_redis, wait_until

pytestmark = pytest.mark.integration

SMALL = {"dataset": {"name": "synthetic", "limit": 600}, "train": {"epochs": 2}}
LONG = {"dataset": {"name": "synthetic", "limit": 4000}, "train": {"epochs": 25}}


@pytest.fixture
def redis_lab(tmp_path: Path) -> Iterator[tuple[Cluster, RedisServer]]:
    with own_redis(tmp_path / "redis") as server, postgres_backend_at(tmp_path) as backend:
        with_redis = Backend("postgres", backend.env | {"BNLAB_BROKER_URL": server.url})
        with cluster(with_redis, tmp_path / "logs") as lab:
            yield lab, server


def test_broker_down_at_submit_503_fast_then_the_run_is_published_when_it_returns(
    redis_lab: tuple[Cluster, RedisServer],
) -> None:
    lab, server = redis_lab
    lab.start_worker()
    server.kill()
    started = time.monotonic()
    response = httpx.post(f"{lab.api_url}/api/v1/runs", json=SMALL, timeout=30)
    assert response.status_code == 503
    assert time.monotonic() - started < 2.5, "submit answers within about 2 s, never hangs"
    run_path = response.headers["location"]
    run_id = run_path.rsplit("/", 1)[1]
    assert lab.run(run_id)["status"] == "queued"
    server.start()  # same port, empty: the message was never taken
    run = lab.wait_status(run_id, {"succeeded", "failed"}, timeout=90)
    assert run["status"] == "succeeded", run["error"]


def test_queued_runs_survive_a_broker_restart(redis_lab: tuple[Cluster, RedisServer]) -> None:
    lab, server = redis_lab
    lab.start_worker()
    busy = lab.submit(LONG)
    lab.wait_status(busy, {"running"})
    waiting = [lab.submit(SMALL) for _ in range(2)]
    server.kill()  # no persistence: the two queued messages are gone
    server.start()
    for run_id in [busy, *waiting]:
        run = lab.wait_status(run_id, {"succeeded", "failed"}, timeout=120)
        assert run["status"] == "succeeded", run["error"]
        assert lab.counts(run_id)[1] == 1


class Marker:
    """Unpickling this touches a file: proof that a pickle was executed."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[Path]]:
        return (Path.touch, (self.path,))


def test_a_pickled_message_pushed_into_the_queue_is_refused_and_nothing_runs(
    redis_lab: tuple[Cluster, RedisServer], tmp_path: Path
) -> None:
    lab, server = redis_lab
    worker = lab.start_worker()
    marker = tmp_path / f"pwned-{uuid.uuid4().hex}"
    queue_name = lab.env["BNLAB_QUEUE"]
    with Connection(server.url) as connection:
        exchange = Exchange(queue_name, type="direct")
        Producer(connection).publish(
            pickle.dumps(([Marker(marker)], {}, {})),
            exchange=exchange,
            routing_key=queue_name,
            declare=[Queue(queue_name, exchange, routing_key=queue_name)],
            content_type="application/x-python-serialize",
            content_encoding="binary",
            headers={"task": "bnlab.train_run", "id": uuid.uuid4().hex, "lang": "py"},
        )
    wait_until(lambda: "pickle" in worker.log.read_text().lower(), 30, "the worker to refuse the message")
    assert not marker.exists(), "the pickle must never be loaded"
    # The worker is still healthy and trains the next legitimate run.
    run_id = lab.submit(SMALL)
    assert lab.wait_status(run_id, {"succeeded", "failed"})["status"] == "succeeded"
    assert not marker.exists()
