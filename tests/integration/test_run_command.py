"""`bnlab run` (what `make run` starts): API and worker together, stopped together by Ctrl-C."""

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
