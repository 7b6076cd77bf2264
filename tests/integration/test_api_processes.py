"""`bnlab api` with several API processes (BNLAB_API_PROCESSES): one port, connections spread over the
processes, a process that dies restarted while the others answer, all of them stopped together."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import Backend, bnlab_free_environ, sqlite_backend_at
from tests.drills.cluster import wait_until
from tests.integration.stack import free_port
from tests.integration.test_run_command import child_pids, is_alive
from tests.serving.conftest import BN_SPEC, NO_BN_SPEC, store_trained_run

pytestmark = pytest.mark.integration

PROCESSES = 2
CONNECTIONS = 40


def socket_inodes(pid: int) -> set[int]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:  # closed since it was listed
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[len("socket:[") : -1]))
    return inodes


def server_side_inode(server_port: int, client_port: int) -> int:
    """The inode of the server's end of the loopback connection from `client_port` (/proc/net/tcp:
    local and remote addresses as hex ip:port, the inode in the tenth column)."""
    local, remote = f"0100007F:{server_port:04X}", f"0100007F:{client_port:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == local and fields[2] == remote:
            return int(fields[9])
    raise AssertionError(f"no connection from port {client_port} in /proc/net/tcp")


def answering_process(port: int, children: list[int]) -> int:
    """Which of `children` accepted a new connection and answered a request on it."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as connection:
        connection.sendall(b"GET /health/live HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert connection.recv(4096).startswith(b"HTTP/1.1 200")
        inode = server_side_inode(port, connection.getsockname()[1])
        (owner,) = [pid for pid in children if inode in socket_inodes(pid)]
        return owner


def live(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health/live", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


@dataclass
class Api:
    process: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def children(self) -> list[int]:
        return child_pids(self.process.pid)

    def wait_until_every_process_answers(self, processes: int) -> list[int]:
        wait_until(lambda: len(self.children()) == processes and live(self.url), 90, "the API processes")
        # Each process binds on its own once forked: wait until every one of them answers.
        children = self.children()
        every_one = set(children)
        wait_until(
            lambda: {answering_process(self.port, children) for _ in range(20)} == every_one, 30, "all"
        )
        return children


@contextmanager
def bnlab_api(backend: Backend, folder: Path, **settings: str) -> Iterator[Api]:
    """`bnlab api` on a free port with these BNLAB_ settings; its log printed if the test fails."""
    port = free_port()
    env = bnlab_free_environ() | backend.env | {"BNLAB_PORT": str(port), "PYTHONUNBUFFERED": "1"}
    env |= {f"BNLAB_{name.upper()}": value for name, value in settings.items()}
    log = folder / "api.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "api"], env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        yield Api(process, port, log)
    except BaseException:
        print(log.read_text()[-6000:])  # noqa: T201 - shown by pytest only when the test fails
        raise
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=45)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


@pytest.mark.timeout(180)
def test_api_processes_share_the_port_restart_alone_and_stop_together(tmp_path: Path) -> None:
    with bnlab_api(sqlite_backend_at(tmp_path), tmp_path, api_processes=str(PROCESSES)) as api:
        children = api.wait_until_every_process_answers(PROCESSES)
        spread = Counter(answering_process(api.port, children) for _ in range(CONNECTIONS))
        assert set(spread) == set(children), spread
        assert min(spread.values()) >= CONNECTIONS // 10, f"connections spread unevenly: {spread}"

        victim, survivor = children
        os.kill(victim, signal.SIGKILL)
        # Connections the kernel had queued for the victim die with it (reset); once it is gone, the
        # other process answers every request while the victim's replacement starts.
        wait_until(lambda: victim not in api.children(), 10, "the supervisor to notice")
        for _ in range(20):
            assert httpx.get(f"{api.url}/health/live", timeout=5).status_code == 200
        wait_until(lambda: len(api.children()) == PROCESSES, 10, "a new API process")
        (replacement,) = set(api.children()) - {survivor}
        pair = [replacement, survivor]
        wait_until(lambda: replacement in {answering_process(api.port, pair) for _ in range(20)}, 30, "it")
        assert "exited unexpectedly (killed by SIGKILL)" in api.log.read_text()

        api.process.send_signal(signal.SIGTERM)
        assert api.process.wait(timeout=45) == 0
        for child in (survivor, replacement):
            assert not is_alive(child), f"API process {child} outlived its parent's SIGTERM"
        assert not live(api.url)


@pytest.mark.timeout(180)
def test_api_processes_stop_when_their_parent_is_killed(tmp_path: Path) -> None:
    """SIGKILL (the OOM killer) leaves no chance to stop them: they must not serve on, unsupervised."""
    with bnlab_api(sqlite_backend_at(tmp_path), tmp_path, api_processes=str(PROCESSES)) as api:
        children = api.wait_until_every_process_answers(PROCESSES)
        os.kill(api.process.pid, signal.SIGKILL)
        api.process.wait()
        wait_until(lambda: not any(is_alive(child) for child in children), 30, "the API processes to stop")
        assert not live(api.url)


def test_one_api_process_is_the_default_and_needs_no_supervisor(tmp_path: Path) -> None:
    with bnlab_api(sqlite_backend_at(tmp_path), tmp_path) as api:
        wait_until(lambda: live(api.url), 90, "the API")
        assert api.children() == [], "one process serves, itself"
        assert answering_process(api.port, [api.process.pid]) == api.process.pid


def test_api_processes_refuse_a_port_another_server_listens_on(tmp_path: Path) -> None:
    """Even one that shares its port the same way (SO_REUSEPORT): its connections must not be ours."""
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        env = bnlab_free_environ() | sqlite_backend_at(tmp_path).env
        env |= {"BNLAB_PORT": str(port), "BNLAB_API_PROCESSES": str(PROCESSES)}
        done = subprocess.run(
            [sys.executable, "-m", "service.cli", "api"], env=env, capture_output=True, text=True, timeout=120
        )
    assert done.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in done.stderr


def infer_on_a_new_connection(url: str, name: str) -> str:
    body = {"inputs": [{"name": "input", "shape": [1, 784], "datatype": "FP32", "data": [0.5] * 784}]}
    answer = httpx.post(f"{url}/v2/models/{name}/infer", json=body, headers={"Connection": "close"})
    assert answer.status_code == 200, answer.text
    return str(answer.json()["parameters"]["run_id"])


@pytest.mark.timeout(180)
def test_an_alias_moved_through_one_api_process_is_served_at_once_by_every_one(
    tmp_path: Path, use_backend: Callable[[Backend], None]
) -> None:
    """Each process reuses what a name means for BNLAB_SERVE_NAME_CACHE_MS; a commit in one of them
    must empty the others' too, or a client's next request could get the alias's previous model."""
    backend = sqlite_backend_at(tmp_path)
    use_backend(backend)
    runs = [store_trained_run(BN_SPEC), store_trained_run(NO_BN_SPEC)]
    # A minute of reuse: a stale name would outlive the test.
    settings = {"api_processes": str(PROCESSES), "serve_name_cache_ms": "60000"}
    with bnlab_api(backend, tmp_path, **settings) as api:
        api.wait_until_every_process_answers(PROCESSES)
        for turn in range(24):
            expected = runs[turn % 2]
            closing = {"Connection": "close"}
            moved = httpx.put(f"{api.url}/api/v1/models/prod", json={"run_id": expected}, headers=closing)
            assert moved.status_code in (200, 201), moved.text
            served = [infer_on_a_new_connection(api.url, "prod") for _ in range(4)]
            assert served == [expected] * 4, f"turn {turn}: the alias points at {expected}"


# A fresh interpreter does what `bnlab api` and `bnlab run` do before they fork their API processes
# (build the app), then forks one child that runs a batched inference in its main thread, as an API
# process answers a small request on its event loop.
FORK_AFTER_CREATE_APP = """
import os, torch
from service.main import create_app
create_app()
pid = os.fork()
if pid == 0:
    net = torch.nn.Sequential(torch.nn.Linear(784, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10)).eval()
    with torch.inference_mode():
        net(torch.full((8, 784), 0.5))
    os._exit(0)
os.waitpid(pid, 0)
"""


def test_a_process_forked_after_the_app_is_built_runs_multithreaded_kernels(tmp_path: Path) -> None:
    """A multi-threaded CPU kernel in the parent before the fork (start-up's flop count once ran
    one) starts OpenMP's threads, which do not survive a fork: the child's first such kernel in its
    main thread then waited for them forever, and the API process hung on its second inference."""
    env = bnlab_free_environ() | sqlite_backend_at(tmp_path).env
    process = subprocess.Popen(
        [sys.executable, "-c", FORK_AFTER_CREATE_APP], env=env, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        _, errors = process.communicate(timeout=60)
    except subprocess.TimeoutExpired as exc:
        os.killpg(process.pid, signal.SIGKILL)  # the hung child too: it is in the same session
        process.communicate()
        raise AssertionError("the forked child hung in its first batched inference") from exc
    assert process.returncode == 0, errors
