"""The supervisor behind `bnlab run`, with real child processes (small Python commands and forks)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from service import supervisor
from service.supervisor import Child, Supervisor, backoff_s, command, exit_reason, forked

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]


def test_restart_delays_double_up_to_a_cap() -> None:
    assert [backoff_s(n) for n in (1, 2, 3, 4)] == [0.5, 1.0, 2.0, 4.0]
    assert backoff_s(20) == supervisor.MAX_BACKOFF_S


def test_exit_reasons_name_the_signal() -> None:
    assert exit_reason(-signal.SIGKILL) == "killed by SIGKILL"
    assert exit_reason(3) == "exit code 3"


def test_a_killed_child_is_restarted_after_its_pause_with_a_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    boss = Supervisor.of({"sleeper": command(SLEEPER)}, grace_s=5)
    (child,) = boss.children
    child.start(now=0.0)
    assert child.process is not None
    first = child.process
    try:
        first.kill()
        first.wait(timeout=10)
        with caplog.at_level(logging.WARNING, logger="service.supervisor"):
            boss.tend(now=10.0)
        assert (
            "sleeper exited unexpectedly (killed by SIGKILL) after 10.0 s; restarting it in 0.5 s"
            in caplog.text
        )
        boss.tend(now=10.4)
        assert child.process is None, "not before its pause is over"
        boss.tend(now=10.5)
        assert child.process is not None
        assert child.process.poll() is None
    finally:
        boss.stop()
    assert child.process.poll() == -signal.SIGTERM


def test_a_child_that_ran_long_enough_restarts_after_the_first_pause_again() -> None:
    child = Child("sleeper", command(SLEEPER), quick_exits=4)
    boss = Supervisor([child], grace_s=5)
    child.start(now=0.0)
    assert child.process is not None
    child.process.kill()
    child.process.wait(timeout=10)
    boss.tend(now=supervisor.STABLE_AFTER_S + 1)
    assert child.quick_exits == 1
    assert child.restart_at == supervisor.STABLE_AFTER_S + 1 + supervisor.FIRST_BACKOFF_S


def test_a_crash_loop_gives_up_and_stops_the_other_children(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(supervisor, "FIRST_BACKOFF_S", 0.01)
    crasher = command([sys.executable, "-c", "raise SystemExit(3)"])
    boss = Supervisor.of({"crasher": crasher, "sleeper": command(SLEEPER)}, grace_s=5)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="service.supervisor"):
        assert boss.run() == 1
    assert time.monotonic() - started < 30
    assert caplog.text.count("crasher exited unexpectedly (exit code 3)") == supervisor.MAX_QUICK_EXITS + 1
    assert "giving up" in caplog.text
    sleeper = boss.children[1].process
    assert sleeper is not None
    assert sleeper.poll() == -signal.SIGTERM


def test_a_forked_child_reports_its_exit_status_like_popen() -> None:
    child = forked(lambda: sys.exit(3))()
    assert child.wait(timeout=10) == 3
    child = forked(lambda: time.sleep(60))()
    child.send_signal(signal.SIGTERM)
    assert child.wait(timeout=10) == -signal.SIGTERM
    with pytest.raises(subprocess.TimeoutExpired):
        forked(lambda: time.sleep(60))().wait(timeout=0.2)


SUPERVISED = """
import sys
from service.supervisor import Supervisor, command
sleeper = command([sys.executable, "-c", "import time; time.sleep(60)"])
sys.exit(Supervisor.of({"a": sleeper, "b": sleeper}, grace_s=5).run())
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_to_the_supervisor_alone_stops_every_child(tmp_path: Path, signum: int) -> None:
    process = subprocess.Popen(
        [sys.executable, "-c", SUPERVISED],
        env=os.environ | {"PYTHONPATH": os.getcwd()},
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while len(children := _children(process.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(children) == 2
        process.send_signal(signum)
        assert process.wait(timeout=20) == 0
        for child in children:
            assert not Path(f"/proc/{child}").exists(), f"child {child} outlived the supervisor"
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _children(pid: int) -> list[int]:
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
