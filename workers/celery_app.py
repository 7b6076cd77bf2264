"""The Celery application of the workers: shared queue configuration plus worker-only settings."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import torch

# torch.optim and the meta device import torch._dynamo on first use: about a second. Imported here,
# before the pool forks, every training process starts with it (a pool process that spent that second
# in its start-up delayed Celery's handling of a killed predecessor's job: a drill caught it).
import torch._dynamo  # noqa: F401
from celery import Celery
from celery.signals import setup_logging, worker_init, worker_process_init, worker_ready, worker_shutting_down

from service.config import get_settings
from service.datasets import loading
from service.db import checkpoint_wal, configure_for_training_process, get_engine, session_scope
from service.ml import nets, training
from service.queue import celery_config
from service.runs import repository as run_repo
from service.runs.reaper import reap_once
from service.runs.runner import notify
from service.searches.service import on_run_event
from service.telemetry import configure_logging
from workers import pool_processes

log = logging.getLogger(__name__)

app = Celery("bnlab", include=["workers.tasks"])
app.conf.update(celery_config(get_settings()))
# After a pool process dies, Celery waits this long for a result it might have sent before it
# declares the job lost and starts a replacement; the default 10 s stalls the whole worker.
app.conf.worker_lost_wait = 2.0
if get_settings().uses_embedded_broker:
    # Remote control needs fanout exchanges that the folder broker only emulates; nobody uses it here.
    app.conf.worker_enable_remote_control = False

# Set at shutdown: the main process's background threads (the reaper, the WAL checkpoints) stop.
_main_threads_stop = threading.Event()
# How often the main process checkpoints SQLite's write-ahead log for its training processes, which
# leave that to it (service/db.py); in a grid of small runs the log grows by a few MiB a second.
WAL_CHECKPOINT_INTERVAL_S = 1.0


def worker_id(nodename: str, pid: int) -> str:
    """What a run's `worker` column records: the Celery node and the pool process."""
    return f"{nodename}/{pid}"


@setup_logging.connect
def _configure_logging(**_: Any) -> None:
    # Connected, this replaces Celery's own logging set-up: the worker logs as the API does (JSON
    # lines by default), and each line written while a run trains carries its run id.
    settings = get_settings()
    configure_logging(settings.log_level, settings.log_format)


@worker_init.connect
def _detach_pool_processes(**_: Any) -> None:
    # Before the pool forks: group signals then reach this main process alone (pool_processes.py).
    pool_processes.leave_group_at_fork()


@worker_process_init.connect
def _watch_main_process(**_: Any) -> None:
    # First of this signal's receivers: an orphan stops before spending seconds warming up.
    pool_processes.die_with_main_process()


@worker_process_init.connect
def _configure_database(**_: Any) -> None:
    # Before anything in this process connects: its commits leave SQLite's checkpoints to this main
    # process, and it polls for the write lock (service/db.py).
    configure_for_training_process()


@worker_process_init.connect
def _configure_torch(**_: Any) -> None:
    # Each pool process trains on its share of the cores (oversubscription slows small models down),
    # with subnormal floats flushed to zero (see configure_training_process).
    training.configure_training_process(get_settings().effective_torch_threads())
    # Once per pool process, here rather than in its first run: what training and the meta device
    # (each run's time limit uses it) set up lazily, the rest of it (torch._dynamo is imported above).
    training.warm_up()
    nets.warm_up_meta_device()
    loading.preload(get_settings())


def _reap() -> None:
    report = reap_once()
    for run_id in report.failed:  # ended here, not by a worker: a search's trial must still hear of it
        notify(on_run_event, run_id)


def _start_repeating(name: str, interval_s: float, job: Callable[[], None]) -> None:
    """Run `job` every `interval_s` seconds in a daemon thread of this main process until shutdown. A
    failure (a database or broker blip) is logged and does not end the loop: the next pass retries."""

    def repeat() -> None:
        while not _main_threads_stop.wait(interval_s):
            try:
                job()
            except Exception:
                log.exception("%s: a pass failed", name)

    threading.Thread(target=repeat, name=f"bnlab-{name}", daemon=True).start()


@worker_ready.connect
def _start_reaper(**_: Any) -> None:
    # The reaper runs in the worker's main process (no torch there: only database and broker calls).
    _reap()  # at start-up: runs orphaned by a previous crash, runs queued while the broker was down
    _start_repeating("reaper", get_settings().reaper_interval_s, _reap)


@worker_ready.connect
def _start_wal_checkpoints(**_: Any) -> None:
    if get_engine().dialect.name == "sqlite":
        _start_repeating("wal-checkpoint", WAL_CHECKPOINT_INTERVAL_S, checkpoint_wal)


@worker_shutting_down.connect
def _hand_back_runs(sender: str, **_: Any) -> None:
    # Warm shutdown (SIGTERM): ask this node's running jobs to checkpoint and return to the queue,
    # instead of holding the shutdown for the rest of a long training run.
    _main_threads_stop.set()
    with session_scope() as session:
        count = run_repo.request_release(session=session, node=sender)
    if count:
        log.info("asked %d running run(s) to hand back before shutdown", count)
