"""The reaper: nothing stays `running` without a live worker, and nothing `queued` is forgotten.

Each worker runs `reap_once` periodically (workers/celery_app.py). Every change it makes is a
conditional UPDATE on the state it observed, so several reapers on several machines can run at once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import timedelta

from service.config import get_settings
from service.db import session_scope
from service.models import Run, utcnow
from service.queue import BrokerUnavailable
from service.runs import repository as run_repo
from service.runs.schemas import RunCreate
from service.runs.service import publish

log = logging.getLogger(__name__)


@dataclass
class ReapReport:
    requeued: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    republished: list[str] = field(default_factory=list)


def orphan_verdict(run: Run, *, max_attempts: int) -> str | None:
    """Why an orphaned run must fail rather than be retried; None to retry it."""
    now = utcnow()
    if run.deadline_at is not None and now > run.deadline_at:
        return "timeout: the run overran its time limit and its worker stopped answering"
    if run.attempts >= max_attempts:
        return (
            f"worker lost: the run's worker stopped answering in {run.attempts} attempts "
            f"(limit {max_attempts}); last worker {run.worker}"
        )
    return None


def reap_once() -> ReapReport:
    settings = get_settings()
    report = ReapReport()
    now = utcnow()
    with session_scope() as session:
        orphans = run_repo.orphaned_runs(
            session=session, heartbeat_before=now - timedelta(seconds=settings.lease_timeout_s)
        )
        for run in orphans:
            verdict = orphan_verdict(run, max_attempts=settings.max_attempts)
            if verdict is not None and run_repo.fail_orphan(session=session, run=run, error=verdict):
                report.failed.append(run.id)
            elif verdict is None and run_repo.requeue_orphan(session=session, run=run):
                report.requeued.append(run.id)
        stale = run_repo.stale_queued_runs(
            session=session, enqueued_before=now - timedelta(seconds=settings.requeue_after_s)
        )
        requeued = [run for run in orphans if run.id in report.requeued]
        to_publish = {run.id: RunCreate.model_validate(run.spec) for run in [*stale, *requeued]}
    for run_id, spec in to_publish.items():
        try:
            publish(run_id, spec)
        except BrokerUnavailable:
            log.warning("reaper: broker unreachable; run %s stays queued for the next pass", run_id)
            continue
        with session_scope() as session:
            run_repo.mark_enqueued(session=session, run_id=run_id)
        report.republished.append(run_id)
    if report.requeued or report.failed or report.republished:
        log.info(
            "reaper: requeued %s, failed %s, published %s", report.requeued, report.failed, report.republished
        )
    return report
