"""Fault drills with real worker processes: kill -9 (pool process, whole worker), SIGTERM, a job
that kills its worker every time, a hung job, a job over its time limit, a duplicate delivery.

Each drill checks what reliability.md asks: no run stays `running` without a live worker, a run
completes exactly once with one stored model, and its metric history stays one continuous series.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from service.cli import SHUTDOWN_GRACE_S
from tests.conftest import postgres_backend_at, sqlite_backend_at
from tests.drills.cluster import Cluster, cluster, wait_until

pytestmark = pytest.mark.integration

EPOCHS = 30


def long_spec(epochs: int = EPOCHS) -> dict[str, Any]:
    """A few seconds of training on 2 cores, many epoch boundaries to checkpoint at."""
    return {
        "name": "drill",
        "dataset": {"name": "synthetic", "limit": 4000},
        "model": {"hidden": [128]},
        "train": {"epochs": epochs, "batch_size": 32},
    }


@pytest.fixture(params=["sqlite", "postgres"])
def lab(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cluster]:
    if request.param == "sqlite":
        with cluster(sqlite_backend_at(tmp_path), tmp_path / "logs") as running:
            yield running
    else:
        with postgres_backend_at(tmp_path) as backend, cluster(backend, tmp_path / "logs") as running:
            yield running


@pytest.fixture
def sqlite_lab(tmp_path: Path) -> Iterator[Cluster]:
    with cluster(sqlite_backend_at(tmp_path), tmp_path / "logs") as running:
        yield running


def epochs_done(lab: Cluster, run_id: str, at_least: int) -> bool:
    return bool(lab.run(run_id)["summary"]["epochs_done"] >= at_least)


def assert_completed_once(lab: Cluster, run_id: str, *, attempts: int) -> None:
    # Generous: on a loaded machine the run is slow, not wrong.
    run = lab.wait_status(run_id, {"succeeded", "failed", "cancelled"}, timeout=240)
    assert run["status"] == "succeeded", run["error"]
    epochs, models = lab.counts(run_id)
    assert epochs == list(range(1, EPOCHS + 1)), "one continuous metric series"
    assert models == 1, "exactly one stored model"
    assert lab.row(run_id)["attempts"] == attempts


def test_pool_process_kill_9_mid_training_resumes_and_completes_once(lab: Cluster) -> None:
    worker = lab.start_worker()
    run_id = lab.submit(long_spec())
    wait_until(lambda: epochs_done(lab, run_id, 3), 60, "three epochs")
    os.kill(worker.pool_child(), signal.SIGKILL)
    assert_completed_once(lab, run_id, attempts=2)
    assert "resumes after epoch" in worker.log.read_text()


def test_whole_worker_kill_9_then_a_new_worker_completes_the_run_once(lab: Cluster) -> None:
    first = lab.start_worker()
    run_id = lab.submit(long_spec())
    wait_until(lambda: epochs_done(lab, run_id, 3), 60, "three epochs")
    first.kill_whole_worker()
    assert lab.run(run_id)["status"] == "running"  # nobody has noticed yet
    second = lab.start_worker()
    assert_completed_once(lab, run_id, attempts=2)
    assert "resumes after epoch" in second.log.read_text()


# `docker stop` signals the main process alone; Ctrl-C, `kill -TERM -PGID` and supervisors its group.
@pytest.mark.parametrize("reaching", ["main process", "process group"])
def test_sigterm_hands_the_run_back_and_the_next_worker_resumes_it(lab: Cluster, reaching: str) -> None:
    first = lab.start_worker()
    run_id = lab.submit(long_spec())
    wait_until(lambda: epochs_done(lab, run_id, 3), 60, "three epochs")
    pool_process = first.pool_child()
    assert os.getpgid(pool_process) == pool_process, "a group signal must not reach the pool directly"
    started = time.monotonic()
    if reaching == "process group":
        os.killpg(first.process.pid, signal.SIGTERM)
    else:
        first.process.send_signal(signal.SIGTERM)
    # A warm shutdown that does not wait for the whole run, within the grace `bnlab run` gives it.
    assert first.process.wait(timeout=SHUTDOWN_GRACE_S) == 0
    print(f"worker exited {time.monotonic() - started:.1f} s after SIGTERM to its {reaching}")  # noqa: T201
    handed_back = lab.run(run_id)
    assert handed_back["status"] == "queued"
    assert first.log.read_text().count("handed back to the queue at shutdown") == 1
    epochs, models = lab.counts(run_id)
    assert models == 0, "no half-written model"
    assert epochs == list(range(1, len(epochs) + 1))
    lab.start_worker()
    assert_completed_once(lab, run_id, attempts=1)  # a hand-back is not a failed attempt


def test_a_pool_process_dies_with_its_main_process(sqlite_lab: Cluster) -> None:
    worker = sqlite_lab.start_worker()
    pool_process = worker.pool_child()
    os.kill(worker.process.pid, signal.SIGKILL)  # the main process alone, as the OOM killer picks it
    worker.process.wait(timeout=10)
    wait_until(lambda: _is_zombie(pool_process), 10, "the orphaned pool process to go")


def test_a_job_that_kills_its_worker_every_time_fails_after_three_attempts(sqlite_lab: Cluster) -> None:
    worker = sqlite_lab.start_worker()
    run_id = sqlite_lab.submit(long_spec())
    killed_attempts: set[int] = set()

    def crash_it_again() -> bool:
        row = sqlite_lab.row(run_id)
        if row["status"] == "failed":
            return True
        if row["status"] == "running" and row["attempts"] not in killed_attempts:
            killed_attempts.add(row["attempts"])
            os.kill(worker.pool_child(), signal.SIGKILL)
        return False

    wait_until(crash_it_again, 90, "the run to fail for good")
    run = sqlite_lab.run(run_id)
    assert "worker lost" in run["error"]
    assert "3 attempts" in run["error"]
    assert killed_attempts == {1, 2, 3}
    assert sqlite_lab.counts(run_id)[1] == 0


def test_a_hung_job_is_killed_at_its_hard_limit_and_fails_with_timeout(tmp_path: Path) -> None:
    with cluster(sqlite_backend_at(tmp_path), tmp_path / "logs", BNLAB_MAX_RUN_SECONDS="5") as lab:
        worker = lab.start_worker()
        # Far longer than the 5 s limit, so that the SIGSTOP always lands mid-run.
        run_id = lab.submit(long_spec(epochs=1000))
        lab.wait_status(run_id, {"running"})
        child = worker.pool_child()
        os.kill(child, signal.SIGSTOP)  # hung where no exception can reach it
        run = lab.wait_status(run_id, {"failed", "succeeded"}, timeout=60)
        assert run["status"] == "failed"
        assert run["error"].startswith("timeout")
        assert lab.counts(run_id)[1] == 0, "no partial model"
        wait_until(
            lambda: not Path(f"/proc/{child}").exists() or _is_zombie(child), 30, "the hung process to go"
        )


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except FileNotFoundError:
        return True


def test_a_run_over_its_time_limit_fails_with_timeout(tmp_path: Path) -> None:
    with cluster(sqlite_backend_at(tmp_path), tmp_path / "logs", BNLAB_MAX_RUN_SECONDS="5") as lab:
        lab.start_worker()
        run_id = lab.submit(long_spec(epochs=1000))
        run = lab.wait_status(run_id, {"failed", "succeeded"}, timeout=60)
        assert run["status"] == "failed"
        assert run["error"].startswith("timeout")
        assert lab.counts(run_id)[1] == 0


def test_a_duplicate_delivery_never_trains_a_run_twice(tmp_path: Path) -> None:
    with cluster(sqlite_backend_at(tmp_path), tmp_path / "logs", BNLAB_WORKER_CONCURRENCY="2") as lab:
        worker = lab.start_worker()
        run_id = lab.submit(long_spec())
        lab.wait_status(run_id, {"running"})
        # A second message for the same run, as Redis sends when a visibility timeout expires.
        _publish_again(lab, run_id)
        wait_until(
            lambda: "skipping this delivery" in worker.log.read_text(), 30, "the duplicate to be refused"
        )
        assert_completed_once(lab, run_id, attempts=1)


def _publish_again(lab: Cluster, run_id: str) -> None:
    import subprocess
    import sys

    code = (
        "from service.runs.service import publish; from service.runs.schemas import RunCreate; "
        f"publish('{run_id}', RunCreate())"
    )
    subprocess.run([sys.executable, "-c", code], env=lab.env, check=True, timeout=60)
