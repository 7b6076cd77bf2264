"""Thin tasks: an id in, the domain function called, the outcome recorded by it."""

from __future__ import annotations

import socket

from service.queue import TRAIN_RUN_TASK
from service.runner import execute_run
from workers.celery_app import app


@app.task(name=TRAIN_RUN_TASK)
def train_run(run_id: str) -> str | None:
    status = execute_run(run_id, worker=f"{socket.gethostname()}:{train_run.request.hostname}")
    return status.value if status else None
