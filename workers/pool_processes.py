"""The worker's pool processes take orders from its main process only, and die with it.

A signal sent to the worker's process group (`kill -TERM -PGID`, a terminal's Ctrl-C, a supervisor)
used to reach the pool processes too. billiard turns a SIGTERM there into an immediate exit from
wherever the process is, then leaves SIGTERM at its default action; billiard itself sends a second
SIGTERM as soon as the dying process reports its death. That report is written under a lock shared
with the main process, with SIGTERM blocked in the writing thread only — and our pool processes run
torch's threads, so the kernel delivers the second SIGTERM to one of those and the process dies
holding the lock. POSIX semaphores are not released when their holder dies: the main process then
waits on that lock forever (in the pool's task handler, or at interpreter exit in
Pool._help_stuff_finish), and the run the pool process was training is neither finished nor handed
back.

So each pool process leaves the worker's process group the moment it is forked: a signal to the
group reaches the main process alone, which shuts the pool down the way `docker stop` does (asks the
running runs to hand back, then tells each pool process to exit). billiard supports pool processes
that lead their own group (its hard time limit then kills the whole group: the process and any
training ranks it started). Out of the group, a pool process no longer dies with a SIGKILL sent to
it, so it watches its parent instead and kills itself once the main process is gone.
"""

from __future__ import annotations

import os
import signal
import threading
import time

# How often a pool process checks that the worker's main process is still there; its run's lease
# outlives this many times over.
PARENT_CHECK_INTERVAL_S = 0.25

_main_pid: int | None = None


def leave_group_at_fork() -> None:
    """In the worker's main process, before the pool starts: every process it forks from now on
    starts a process group of its own."""
    global _main_pid
    if _main_pid is None:  # once: hooks cannot be unregistered
        _main_pid = os.getpid()
        os.register_at_fork(after_in_child=_leave_group)


def _leave_group() -> None:
    # Runs in the forked child before any other Python code: no window in which a group signal
    # could still reach it. Only the main process's own children (a pool process that forks keeps
    # its children in its group, where its hard time limit finds them).
    if os.getppid() == _main_pid:
        os.setpgid(0, 0)


def die_with_main_process() -> None:
    """In a pool process: kill it, and the group it leads, once the worker's main process is gone
    (SIGKILL, OOM killer), as if the signal had reached the group it left."""
    main_pid = _main_pid if _main_pid is not None else os.getppid()
    threading.Thread(target=_watch, args=(main_pid,), name="bnlab-parent-watch", daemon=True).start()


def _watch(main_pid: int) -> None:
    while os.getppid() == main_pid:  # an orphan is re-parented: to init or the nearest subreaper
        time.sleep(PARENT_CHECK_INTERVAL_S)
    if os.getpgid(0) == os.getpid():
        os.killpg(0, signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)
