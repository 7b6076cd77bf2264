"""The worker's Celery configuration: the defaults that lose jobs are overridden."""

from __future__ import annotations

from service.queue import TRAIN_RUN_TASK
from workers.celery_app import app
from workers.tasks import train_run


def test_json_only_late_ack_one_message_at_a_time() -> None:
    conf = app.conf
    assert conf.task_serializer == "json"
    assert list(conf.accept_content) == ["json"]
    assert conf.task_acks_late is True
    assert conf.worker_prefetch_multiplier == 1
    assert conf.task_ignore_result is True


def test_the_api_enqueues_the_task_the_worker_registers_by_name() -> None:
    assert train_run.name == TRAIN_RUN_TASK
    assert TRAIN_RUN_TASK in app.tasks


def test_the_longest_hard_time_limit_is_below_the_redis_visibility_timeout() -> None:
    # Otherwise Redis would hand a still-running job to a second worker (reliability check 3/4).
    from service.config import Settings
    from service.queue import broker_transport_options, hard_time_limit_s

    settings = Settings(broker_url="redis://127.0.0.1:6379/0")
    options = broker_transport_options(settings)
    assert hard_time_limit_s(settings.max_run_seconds) < options["visibility_timeout"]
    assert app.conf.worker_lost_wait <= 5
