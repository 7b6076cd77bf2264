"""Start bnlab as a user would: `bnlab migrate`, `bnlab api` and `bnlab worker` as real processes.

Each process is stopped by its own PID at the end; only loopback addresses are used.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import (
    ONE_TORCH_THREAD,
    Backend,
    bnlab_free_environ,
    postgres_backend_at,
    sqlite_backend_at,
)

STARTUP_TIMEOUT_S = 60


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Stack:
    base_url: str
    client: httpx.Client
    logs: Path
    data_dir: Path  # BNLAB_DATA_DIR: on SQLite, the database file's folder

    def submit(self, spec: dict[str, Any]) -> str:
        response = self.client.post("/api/v1/runs", json=spec)
        assert response.status_code == 202, response.text
        return str(response.json()["id"])

    def run(self, run_id: str) -> dict[str, Any]:
        body: dict[str, Any] = self.client.get(f"/api/v1/runs/{run_id}").json()
        return body

    def wait_for(self, run_id: str, statuses: set[str], timeout: float = 120) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = self.run(run_id)
            if run["status"] in statuses:
                return run
            time.sleep(0.2)
        raise AssertionError(
            f"run {run_id} still {self.run(run_id)['status']} after {timeout}s\n{self.tail_logs()}"
        )

    def tail_logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.logs.glob("*.log")))


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def _wait_ready(client: httpx.Client, processes: list[subprocess.Popen[bytes]]) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        for process in processes:
            if process.poll() is not None:
                raise RuntimeError(f"process {process.args} exited with {process.returncode}")
        try:
            if client.get("/health/ready").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError("the API did not become ready")


@contextmanager
def start_stack(backend: Backend, logs: Path, extra_env: dict[str, str] | None = None) -> Iterator[Stack]:
    """API and worker on `backend`, one torch thread per training process unless `extra_env` says
    otherwise (ONE_TORCH_THREAD says why)."""
    port = free_port()
    env = (
        bnlab_free_environ()
        | backend.env
        | ONE_TORCH_THREAD
        | {"BNLAB_PORT": str(port), "PYTHONUNBUFFERED": "1"}
    )
    env |= extra_env or {}
    logs.mkdir(parents=True, exist_ok=True)
    bnlab = [sys.executable, "-m", "service.cli"]
    subprocess.run([*bnlab, "migrate"], env=env, check=True, capture_output=True, timeout=60)
    processes: list[subprocess.Popen[bytes]] = []
    try:
        for role in ("worker", "api"):
            with (logs / f"{role}.log").open("wb") as log_file:
                processes.append(
                    subprocess.Popen([*bnlab, role], env=env, stdout=log_file, stderr=subprocess.STDOUT)
                )
        base_url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=base_url, timeout=30) as client:
            _wait_ready(client, processes)
            yield Stack(base_url=base_url, client=client, logs=logs, data_dir=Path(env["BNLAB_DATA_DIR"]))
    finally:
        for process in processes:
            _stop(process)


@contextmanager
def stack_on(database: str, folder: Path, extra_env: dict[str, str] | None = None) -> Iterator[Stack]:
    """A stack on "sqlite" (with the embedded folder broker, as `make run`) or on "postgres" (a fresh
    database, with Redis, as docker-compose): the two backends every end-to-end test runs on."""
    if database == "sqlite":
        with start_stack(sqlite_backend_at(folder), folder / "logs", extra_env) as running:
            yield running
    else:
        with (
            postgres_backend_at(folder) as backend,
            start_stack(backend, folder / "logs", extra_env) as running,
        ):
            yield running
