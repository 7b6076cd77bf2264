"""The queue as the service sees it: Celery configuration shared by the API (producer) and the
workers (consumers), and enqueueing by task name, so the service never imports `workers`."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from celery import Celery
from kombu.exceptions import OperationalError

from service.config import Settings, get_settings

TRAIN_RUN_TASK = "bnlab.train_run"


class BrokerUnavailable(RuntimeError):
    """The broker could not take the message within PUBLISH_TIMEOUT_S."""


# Seconds the API waits for the broker before answering 503: a submit never hangs.
PUBLISH_TIMEOUT_S = 2.0
# The hard limit follows the soft one by a tenth of it, between 2 s and a minute: time to fail the
# run cleanly before the process is killed.
MAX_HARD_LIMIT_GRACE_S = 60


def hard_time_limit_s(soft_limit_s: int) -> int:
    return soft_limit_s + min(MAX_HARD_LIMIT_GRACE_S, max(2, soft_limit_s // 10))


def broker_transport_options(settings: Settings) -> dict[str, Any]:
    if settings.uses_embedded_broker:
        folder = settings.broker_folder
        for sub in ("queue", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        return {
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "control_folder": str(folder / "control"),
            # The worker polls the folder and takes one message a poll: a message published to an
            # idle worker waits up to an interval (a run's end wakes a busy worker's loop at once:
            # service/embedded_broker.py). 10 ms; an idle worker's main process spends about 2 %
            # of a core on it, against 0.5 % at 50 ms.
            "polling_interval": 0.01,
        }
    # Fail fast when a networked broker is down instead of hanging the caller.
    return {
        "socket_connect_timeout": PUBLISH_TIMEOUT_S,
        "visibility_timeout": settings.broker_visibility_timeout_s,
    }


# kombu's filesystem transport, with atomic message writes (see service/embedded_broker.py).
EMBEDDED_TRANSPORT = "service.embedded_broker:Transport"


def celery_config(settings: Settings) -> dict[str, Any]:
    return {
        "broker_url": settings.broker_url,
        "broker_transport": EMBEDDED_TRANSPORT if settings.uses_embedded_broker else None,
        "broker_transport_options": broker_transport_options(settings),
        "broker_connection_retry_on_startup": True,
        # JSON only: a pickled message pushed into the queue is refused, never executed.
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_serializer": "json",
        # Run state lives in bnlab's database; Celery results are never read.
        "task_ignore_result": True,
        "result_backend": None,
        "task_default_queue": settings.queue,
        # Ack after the task body ran, one message at a time: a crashed worker does not swallow a job.
        "task_acks_late": True,
        "worker_prefetch_multiplier": 1,
        "worker_concurrency": settings.training_processes,
        "worker_hijack_root_logger": False,
        "enable_utc": True,
    }


@lru_cache
def producer_app() -> Celery:
    app = Celery("bnlab-producer", set_as_current=False)
    app.conf.update(celery_config(get_settings()))
    return app


def enqueue_training(run_id: str, *, time_limit_s: int) -> None:
    """Publish the training task for a committed run. Raises if the broker cannot be reached in time.

    The soft limit raises inside the task (the run fails with "timeout"); the hard limit, a minute
    later, kills a process stuck where no exception can reach it.
    """
    settings = get_settings()
    try:
        producer_app().send_task(
            TRAIN_RUN_TASK,
            args=[run_id],
            queue=settings.queue,
            soft_time_limit=time_limit_s,
            time_limit=hard_time_limit_s(time_limit_s),
            retry=True,
            retry_policy={
                "max_retries": 1,
                "interval_start": 0,
                "interval_step": 0.5,
                "interval_max": 0.5,
            },
        )
    except (OperationalError, OSError) as exc:
        raise BrokerUnavailable(str(exc)) from exc


def broker_reachable() -> bool:
    with producer_app().connection_for_write() as connection:
        try:
            connection.ensure_connection(max_retries=1, timeout=int(PUBLISH_TIMEOUT_S))
        except Exception:  # any transport error means "not reachable" for a readiness probe
            return False
        return True
