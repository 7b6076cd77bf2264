"""`bnlab run` (what `make run` starts): API and worker together, restarted when one dies, stopped
together by Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import bnlab_free_environ, sqlite_backend_at
from tests.drills.cluster import FAST_LEASES, Cluster, wait_until
from tests.drills.test_worker_faults import assert_completed_once, epochs_done, long_spec
from tests.integration.stack import free_port

pytestmark = pytest.mark.integration


def child_pids(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(child) for child in children]


def is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_ctrl_c_stops_api_and_worker(tmp_path: Path) -> None:
    port = free_port()
    env = bnlab_free_environ() | sqlite_backend_at(tmp_path).env | {"BNLAB_PORT": str(port)}
    with (tmp_path / "run.log").open("wb") as log:
        # A session of its own, like a terminal's foreground process group.
        process = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "run"], env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        else:
            raise AssertionError((tmp_path / "run.log").read_text())
        children = child_pids(process.pid)
        assert len(children) == 2, "an API process and a worker process"
        response = httpx.post(
            f"http://127.0.0.1:{port}/api/v1/runs", json={"dataset": {"name": "synthetic", "limit": 200}}
        )
        assert response.status_code == 202

        os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C sends
        assert process.wait(timeout=45) == 0
        for child in children:
            assert not is_alive(child), f"child {child} outlived Ctrl-C"
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def role(pid: int) -> str:
    command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    return "worker" if b"worker" in command else "api"  # the API is a fork of `bnlab run` itself


def ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health/ready", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


@pytest.mark.timeout(600)  # a loaded machine trains slowly
@pytest.mark.parametrize("victim", ["api", "worker"])
def test_a_child_killed_by_sigkill_is_restarted_and_the_run_finishes_once(
    tmp_path: Path, victim: str
) -> None:
    port = free_port()
    env = bnlab_free_environ() | sqlite_backend_at(tmp_path).env | FAST_LEASES | {"BNLAB_PORT": str(port)}
    log_path = tmp_path / "run.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "run"], env=env | {"PYTHONUNBUFFERED": "1"}, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    lab = Cluster(env=env, folder=tmp_path, api_url=f"http://127.0.0.1:{port}")
    try:
        wait_until(lambda: ready(lab.api_url), 90, "the API")
        # The drills' run on fewer samples: as many epochs, a third of the time.
        run_id = lab.submit(long_spec() | {"dataset": {"name": "synthetic", "limit": 1500}})
        wait_until(lambda: epochs_done(lab, run_id, 3), 90, "three epochs")
        (child,) = [pid for pid in child_pids(process.pid) if role(pid) == victim]

        os.kill(child, signal.SIGKILL)
        killed = time.monotonic()
        wait_until(lambda: child not in child_pids(process.pid), 10, "the supervisor to notice")
        wait_until(lambda: ready(lab.api_url), 10, "the API to answer again")
        answered = time.monotonic() - killed
        new = wait_until(lambda: [p for p in child_pids(process.pid) if role(p) == victim], 10, "a new child")
        print(f"SIGKILL to the {victim}: the API answered again after {answered:.2f} s")  # noqa: T201
        if victim == "worker":
            wait_until(lambda: log_path.read_text().count(' ready."') == 2, 60, "the new worker")
            print(f"  the new worker was ready {time.monotonic() - killed:.1f} s after the SIGKILL")  # noqa: T201
        assert f"{victim} exited unexpectedly (killed by SIGKILL)" in log_path.read_text()

        assert_completed_once(lab, run_id, attempts=2 if victim == "worker" else 1)
        if victim == "worker":
            print(f"  the run finished on the restarted worker {time.monotonic() - killed:.1f} s after")  # noqa: T201
        assert process.poll() is None, "bnlab run is still supervising"
        assert sorted(map(role, child_pids(process.pid))) == ["api", "worker"]
        assert new[0] in child_pids(process.pid)
    except BaseException:
        print(log_path.read_text()[-6000:])  # noqa: T201 - shown by pytest only when the test fails
        raise
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=45)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
