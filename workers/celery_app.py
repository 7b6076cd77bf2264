"""The Celery application of the workers: shared queue configuration plus worker-only settings."""

from __future__ import annotations

import logging
from typing import Any

import torch
from celery import Celery
from celery.signals import worker_process_init, worker_ready

from service.config import get_settings
from service.queue import celery_config, enqueue_training
from service.runner import queued_run_ids

log = logging.getLogger(__name__)

app = Celery("bnlab", include=["workers.tasks"])
app.conf.update(celery_config(get_settings()))
if get_settings().uses_embedded_broker:
    # Remote control needs fanout exchanges that the folder broker only emulates; nobody uses it here.
    app.conf.worker_enable_remote_control = False


@worker_process_init.connect
def _configure_torch(**_: Any) -> None:
    # Each pool process trains on its share of the cores; oversubscription slows small models down.
    torch.set_num_threads(get_settings().effective_torch_threads())


@worker_ready.connect
def _requeue_waiting_runs(**_: Any) -> None:
    # Runs committed while the broker was down (or lost with a non-persistent broker) are still
    # `queued` in the database. Enqueue them again; a duplicate delivery cannot claim a run twice.
    run_ids = queued_run_ids()
    for run_id in run_ids:
        enqueue_training(run_id)
    if run_ids:
        log.info("re-enqueued %d queued run(s) found at start-up", len(run_ids))
