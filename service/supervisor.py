"""What `bnlab run` does with its children (the API and a worker): keeps them running, and stops them
together.

A child is started by a command (subprocess.Popen) or by forking this process to run a function (the
API, whose imports and app are built once here: a restart then takes a fork, not the seconds of
importing torch and FastAPI again).

A child that exits while nobody asked it to is started again, after a pause that doubles with each
exit in a row that came soon after its start (a crash loop is not retried flat out, and gives up after
a few tries). Ctrl-C or SIGTERM stops every child: SIGTERM to each (the worker then hands its runs
back), then SIGKILL to what is still running after the grace period.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import NoReturn, Protocol

log = logging.getLogger(__name__)

# Restart delays: 0.5 s, 1 s, 2 s ... for exits in a row, each within STABLE_AFTER_S of its start.
FIRST_BACKOFF_S = 0.5
MAX_BACKOFF_S = 30.0
# A child that ran this long had recovered: its next exit starts the delays from the first again.
STABLE_AFTER_S = 60.0
# Exits in a row, each soon after its start, before `bnlab run` gives up (a port taken, a bad
# setting: restarting will not help, and the user should see it).
MAX_QUICK_EXITS = 5
# How often the children are checked; also the latency of reacting to a signal.
POLL_S = 0.1
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class Process(Protocol):
    """What the supervisor needs of a child: subprocess.Popen's methods of the same names."""

    def poll(self) -> int | None: ...
    def send_signal(self, sig: int, /) -> None: ...
    def kill(self) -> None: ...
    def wait(self, timeout: float | None = None) -> int: ...


Start = Callable[[], Process]


def command(argv: list[str]) -> Start:
    return lambda: subprocess.Popen(argv)


@dataclass
class ForkedProcess:
    """A child forked from this process: the Popen methods the supervisor uses, for a bare PID."""

    pid: int
    returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)  # -N when killed by signal N
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while (returncode := self.poll()) is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(str(self.pid), timeout or 0.0)
            time.sleep(POLL_S)
        return returncode

    def send_signal(self, sig: int, /) -> None:
        if self.poll() is None:  # never signal a PID that may have been reused
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def forked(function: Callable[[], object]) -> Start:
    """Start by forking this process to run `function`. Safe while this process has one thread,
    as the supervisor does, and has run no multi-threaded torch kernel: OpenMP's threads do not
    survive a fork, and a child's first such kernel would wait for them forever (hence the API's
    start-up warm-up stays on the meta device: nets.warm_up_meta_device)."""

    def start() -> ForkedProcess:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()  # or the child would write what is buffered here a second time
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:
            _run_forked(function, parent)
        return ForkedProcess(pid)

    return start


def _run_forked(function: Callable[[], object], parent: int) -> NoReturn:
    status = 1
    try:
        for signum in STOP_SIGNALS:  # the supervisor's handlers only set a flag in its copy
            signal.signal(signum, signal.SIG_DFL)
        _die_with(parent)
        function()
        status = 0
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        log.exception("child process failed")
    finally:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(status)  # never return into the supervisor's loop


def _die_with(parent: int) -> None:
    """A SIGTERM to this child when the supervisor dies, even by SIGKILL (the OOM killer, kill -9):
    an API process left behind would go on serving the port with nobody to stop or restart it.
    Linux's parent-death signal; elsewhere nothing."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return
    prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it died before the line above: no signal will come
        os.kill(os.getpid(), signal.SIGTERM)


def exit_reason(returncode: int) -> str:
    if returncode < 0:
        return f"killed by {signal.Signals(-returncode).name}"
    return f"exit code {returncode}"


def backoff_s(quick_exits: int) -> float:
    """The pause before restarting a child that has exited `quick_exits` times in a row."""
    return float(min(MAX_BACKOFF_S, FIRST_BACKOFF_S * 2 ** max(0, quick_exits - 1)))


@dataclass
class Child:
    name: str
    starter: Start
    process: Process | None = None
    started_at: float = 0.0
    quick_exits: int = 0  # exits in a row, each within STABLE_AFTER_S of its start
    restart_at: float = 0.0  # when a child that exited is started again

    def start(self, now: float) -> None:
        self.process = self.starter()
        self.started_at = now

    def exited(self) -> int | None:
        """The return code of a child that has exited since it was last seen running."""
        return None if self.process is None else self.process.poll()


@dataclass
class Supervisor:
    children: list[Child]
    grace_s: float
    stop_signal: int | None = field(default=None, init=False)
    gave_up: bool = field(default=False, init=False)

    @classmethod
    def of(cls, starters: Mapping[str, Start], *, grace_s: float) -> Supervisor:
        return cls([Child(name, start) for name, start in starters.items()], grace_s)

    def run(self) -> int:
        """Supervise until a stop signal (exit status 0) or a crash loop (1); the children are
        stopped either way."""
        previous = {signum: signal.signal(signum, self._on_signal) for signum in STOP_SIGNALS}
        try:
            for child in self.children:
                child.start(time.monotonic())
            while self.stop_signal is None and not self.gave_up:
                self.tend(time.monotonic())
                time.sleep(POLL_S)
        finally:
            self.stop()
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        return 1 if self.gave_up else 0

    def _on_signal(self, signum: int, _frame: object) -> None:
        # Only a flag: the loop stops at its next turn, never half-way through starting a child.
        self.stop_signal = signum

    def tend(self, now: float) -> None:
        """Note the children that exited; start those whose pause is over."""
        for child in self.children:
            returncode = child.exited()
            if returncode is not None:
                self._schedule_restart(child, returncode, now)
            elif child.process is None and now >= child.restart_at and not self.gave_up:
                log.info("starting %s again", child.name)
                child.start(now)

    def _schedule_restart(self, child: Child, returncode: int, now: float) -> None:
        uptime = now - child.started_at
        child.process = None
        child.quick_exits = 1 if uptime >= STABLE_AFTER_S else child.quick_exits + 1
        if child.quick_exits > MAX_QUICK_EXITS:
            log.error(
                "%s exited unexpectedly (%s) %d times in a row, each within %.0f s of its start; "
                "giving up and stopping everything",
                child.name, exit_reason(returncode), child.quick_exits, STABLE_AFTER_S,
            )  # fmt: skip
            self.gave_up = True
            return
        delay = backoff_s(child.quick_exits)
        child.restart_at = now + delay
        log.warning(
            "%s exited unexpectedly (%s) after %.1f s; restarting it in %.1f s",
            child.name, exit_reason(returncode), uptime, delay,
        )  # fmt: skip

    def stop(self) -> None:
        """SIGTERM to every running child, SIGKILL to those still running after the grace period."""
        running = [child.process for child in self.children if child.process is not None]
        if self.stop_signal is not None:
            log.info("%s received: stopping", signal.Signals(self.stop_signal).name)
        for process in running:
            if process.poll() is None:
                # Even after a Ctrl-C that reached them already: a signal sent to `bnlab run` alone
                # must stop them too, and a second SIGTERM is harmless to both (uvicorn and Celery
                # treat it as the first).
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s
        for process in running:
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()  # reap it: a killed child left unwaited stays a zombie
