"""Thin tasks: an id in, the domain function called, the outcome recorded by it."""

from __future__ import annotations

import os

from service.queue import TRAIN_RUN_TASK
from service.runs.runner import execute_run, notify
from service.searches.service import epoch_hook, on_run_event
from service.telemetry import run_context
from workers.celery_app import app, worker_id


@app.task(name=TRAIN_RUN_TASK)
def train_run(run_id: str) -> str | None:
    with run_context(run_id):
        worker = worker_id(train_run.request.hostname or "unknown", os.getpid())
        # A search's trial advances on its runs' epochs (pruning) and ends (tell, ask the next).
        status = execute_run(run_id, worker=worker, on_epoch=epoch_hook(run_id))
        notify(on_run_event, run_id)
    return status.value if status else None
