"""128 concurrent clients against a real `bnlab api`: past the in-flight cap requests wait in the
queue and are all answered 200; past the queue too they get 503 with Retry-After, and the liveness
probes answer 200 throughout. Load from hey (a compiled load generator), bounded to a few seconds,
on loopback; the API is a real process started here and stopped by its PID."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from fastapi.testclient import TestClient

from tests.conftest import Backend, bnlab_free_environ
from tests.integration.stack import _stop, free_port
from tests.load.run_load import IMAGE, hey_command, parse_hey

CLIENTS = 128
UNLIMITED_RATE = {"BNLAB_RATE_LIMIT_PER_MINUTE": "1000000", "BNLAB_RATE_LIMIT_BURST": "100000"}


@contextmanager
def running_api(backend: Backend, logs: Path, settings: dict[str, str]) -> Iterator[str]:
    port = free_port()
    env = bnlab_free_environ() | backend.env | UNLIMITED_RATE | settings | {"BNLAB_PORT": str(port)}
    with (logs / f"api-{port}.log").open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "api"], env=env, stdout=log, stderr=subprocess.STDOUT
        )
    base_url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=base_url, timeout=5) as client:
            for _ in range(300):
                try:
                    if client.get("/health/live").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert process.poll() is None, (logs / f"api-{port}.log").read_text()
                time.sleep(0.1)
        yield base_url
    finally:
        _stop(process)


def infer_body(tmp_path: Path) -> Path:
    body = tmp_path / "infer.json"
    tensor = {"name": "input", "shape": [1, 784], "datatype": "FP32", "data": IMAGE}
    body.write_text(json.dumps({"inputs": [tensor]}))
    return body


def test_128_clients_past_the_in_flight_cap_all_get_200(
    client: TestClient, sqlite_backend: Backend, bn_run: str, tmp_path: Path
) -> None:
    assert shutil.which("hey"), "this test needs hey (Debian: apt-get install hey)"
    # A cap well below 128 clients: most requests meet it and wait in the queue (the default, 256).
    with running_api(sqlite_backend, tmp_path, {"BNLAB_MAX_CONCURRENT_REQUESTS": "16"}) as base_url:
        url = f"{base_url}/v2/models/{bn_run}/infer"
        command = hey_command(url, "-z", "3s", "-c", str(CLIENTS), body=infer_body(tmp_path), timeout_s=30)
        done = subprocess.run(command, capture_output=True, text=True, check=True, timeout=60)
    load = parse_hey("V2 infer, 128 clients", done.stdout)
    assert load.answered >= CLIENTS, done.stdout  # every client got at least one answer
    assert load.statuses == {200: load.answered}, done.stdout
    assert load.errors == {}, done.stdout


def test_past_the_queue_503_with_retry_after_and_health_is_never_refused(
    client: TestClient, sqlite_backend: Backend, bn_run: str, tmp_path: Path
) -> None:
    assert shutil.which("hey"), "this test needs hey (Debian: apt-get install hey)"
    tight = {"BNLAB_MAX_CONCURRENT_REQUESTS": "1", "BNLAB_MAX_QUEUED_REQUESTS": "1"}
    with running_api(sqlite_backend, tmp_path, tight) as base_url:
        url = f"{base_url}/v2/models/{bn_run}/infer"
        command = hey_command(url, "-z", "4s", "-c", str(CLIENTS), body=infer_body(tmp_path), timeout_s=30)
        load = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            refused, probes = asyncio.run(_probe_while_loaded(base_url, bn_run))
        finally:
            stdout, _ = load.communicate(timeout=60)
    summary = parse_hey("V2 infer, cap 1, queue 1", stdout)
    assert set(summary.statuses) == {200, 503}, stdout  # some served, the rest refused at once
    assert summary.errors == {}, stdout
    assert refused, "no probe met the full queue"
    for answer in refused:
        assert answer.headers["retry-after"] == "1"
        assert answer.json() == {
            "detail": "the server is at its concurrency limit; retry shortly",
            "errors": [],
        }
    assert probes, "no health probe was sent"
    assert set(probes) == {200}, probes


async def _probe_while_loaded(base_url: str, run_id: str) -> tuple[list[httpx.Response], list[int]]:
    """For up to 3 s while hey runs: infer requests until a few were refused, and health probes."""
    body = {"inputs": [{"name": "input", "shape": [1, 784], "datatype": "FP32", "data": IMAGE}]}
    refused: list[httpx.Response] = []
    probes: list[int] = []
    async with httpx.AsyncClient(base_url=base_url, timeout=20) as client:
        await asyncio.sleep(0.5)  # hey's clients are connected and sending
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 3
        while loop.time() < deadline and len(refused) < 3:
            answers = await asyncio.gather(
                *(client.post(f"/v2/models/{run_id}/infer", json=body) for _ in range(4)),
                client.get("/health/live"),
                client.get("/v2/health/live"),
            )
            refused += [a for a in answers[:4] if a.status_code == 503]
            probes += [a.status_code for a in answers[4:]]
    return refused, probes
