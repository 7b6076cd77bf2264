"""Real bnlab processes for fault drills: one API, workers that can be killed, stopped or restarted,
and optionally a Redis server of the drill's own. Everything binds to 127.0.0.1, and every process
is stopped by the PID this module started it with.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import create_engine, func, select

from service.models import EpochMetric, ModelArtifact, Run
from tests.conftest import ONE_TORCH_THREAD, Backend, bnlab_free_environ
from tests.integration.stack import free_port

# Leases short enough for drills to finish in seconds.
FAST_LEASES = {
    "BNLAB_HEARTBEAT_INTERVAL_S": "0.3",
    "BNLAB_LEASE_TIMEOUT_S": "2",
    "BNLAB_REAPER_INTERVAL_S": "0.5",
    "BNLAB_REQUEUE_AFTER_S": "2",
}


def wait_until(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def stop_process(process: subprocess.Popen[bytes], *, group: bool = False) -> None:
    if process.poll() is not None:
        return
    if group:
        os.killpg(process.pid, signal.SIGKILL)
    else:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
            return
        except subprocess.TimeoutExpired:
            process.kill()
    process.wait(timeout=10)


@dataclass
class Worker:
    process: subprocess.Popen[bytes]
    log: Path

    def pool_children(self) -> list[int]:
        # Every thread's list: billiard starts replacement pool processes from a helper thread.
        children: list[int] = []
        for task in Path(f"/proc/{self.process.pid}/task").glob("*"):
            try:
                children += [int(pid) for pid in (task / "children").read_text().split()]
            except FileNotFoundError:
                continue
        return children

    def pool_child(self) -> int:
        children: list[int] = wait_until(self.pool_children, 30, "a pool process")
        return children[0]

    def kill_whole_worker(self) -> None:
        """SIGKILL to the worker's process group, as an OOM or a lost machine would: the main process
        at once, its pool processes (which lead groups of their own) as they see it gone."""
        stop_process(self.process, group=True)


@dataclass
class Cluster:
    env: dict[str, str]
    folder: Path
    api_url: str = ""
    api: subprocess.Popen[bytes] | None = None
    workers: list[Worker] = field(default_factory=list)

    def start_api(self) -> None:
        port = free_port()
        self.api_url = f"http://127.0.0.1:{port}"
        self.api = self._spawn("api", {"BNLAB_PORT": str(port)}, self.folder / "api.log")
        wait_until(self._api_up, 60, "the API")

    def _api_up(self) -> bool:
        try:
            return httpx.get(f"{self.api_url}/health/live", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def start_worker(self, **extra: str) -> Worker:
        log = self.folder / f"worker-{len(self.workers)}.log"
        worker = Worker(self._spawn("worker", extra, log), log)
        self.workers.append(worker)
        return worker

    def _spawn(self, role: str, extra: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
        with log.open("wb") as out:
            return subprocess.Popen(
                [sys.executable, "-m", "service.cli", role], env=self.env | extra, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip

    def submit(self, spec: dict[str, Any]) -> str:
        response = httpx.post(f"{self.api_url}/api/v1/runs", json=spec, timeout=10)
        assert response.status_code == 202, response.text
        return str(response.json()["id"])

    def run(self, run_id: str) -> dict[str, Any]:
        body: dict[str, Any] = httpx.get(f"{self.api_url}/api/v1/runs/{run_id}", timeout=10).json()
        return body

    def wait_status(self, run_id: str, statuses: set[str], timeout: float = 90) -> dict[str, Any]:
        run: dict[str, Any] = wait_until(
            lambda: (r := self.run(run_id))["status"] in statuses and r,
            timeout,
            f"run {run_id} in {statuses}",
        )
        return run

    def row(self, run_id: str) -> dict[str, Any]:
        """The run's database row, lease columns included (the API does not show them)."""
        engine = create_engine(self.database_url)
        try:
            with engine.connect() as connection:
                return dict(connection.execute(select(Run.__table__).where(Run.id == run_id)).one()._mapping)
        finally:
            engine.dispose()

    def counts(self, run_id: str) -> tuple[list[int], int]:
        """(the epochs recorded, in order; the number of stored models) for a run."""
        engine = create_engine(self.database_url)
        try:
            with engine.connect() as connection:
                epochs = connection.scalars(
                    select(EpochMetric.epoch).where(EpochMetric.run_id == run_id).order_by(EpochMetric.epoch)
                ).all()
                models = connection.scalar(
                    select(func.count()).select_from(ModelArtifact).where(ModelArtifact.run_id == run_id)
                )
                return list(epochs), int(models or 0)
        finally:
            engine.dispose()

    @property
    def database_url(self) -> str:
        return self.env.get("BNLAB_DATABASE_URL") or f"sqlite:///{self.env['BNLAB_DATA_DIR']}/bnlab.db"

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-4000:]}" for p in sorted(self.folder.glob("*.log")))

    def stop(self) -> None:
        for worker in self.workers:
            for child in worker.pool_children():  # a SIGSTOPped child must be woken to die
                os.kill(child, signal.SIGCONT)
            stop_process(worker.process)
        if self.api is not None:
            stop_process(self.api)


@contextmanager
def cluster(backend: Backend, folder: Path, **extra: str) -> Iterator[Cluster]:
    env = (
        bnlab_free_environ()
        | backend.env
        | FAST_LEASES
        | ONE_TORCH_THREAD
        | extra
        | {"PYTHONUNBUFFERED": "1"}
    )
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "service.cli", "migrate"], env=env, check=True, capture_output=True)
    running = Cluster(env=env, folder=folder)
    try:
        running.start_api()
        yield running
    except BaseException:
        print(running.logs())  # noqa: T201 - shown by pytest only when the drill fails
        raise
    finally:
        running.stop()


@dataclass
class RedisServer:
    """A Redis of the drill's own, on a free loopback port, so killing it touches nothing else."""

    port: int
    folder: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.folder)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        import redis

        client = redis.Redis(port=self.port)
        wait_until(lambda: self._pings(client), 10, "redis")
        client.close()

    @staticmethod
    def _pings(client: Any) -> bool:
        try:
            return bool(client.ping())
        except Exception:
            return False

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None


@contextmanager
def own_redis(folder: Path) -> Iterator[RedisServer]:
    folder.mkdir(parents=True, exist_ok=True)
    server = RedisServer(port=free_port(), folder=folder)
    server.start()
    try:
        yield server
    finally:
        server.kill()
