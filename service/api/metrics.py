"""GET /metrics for Prometheus, and the middleware that gives each request an id, a log line and
its place in the HTTP metrics.

Two sources, one exposition: this process's own counters (service.telemetry: HTTP by route,
inference per model, micro-batch sizes), and the training figures read from the database at scrape
time by DatabaseCollector. The database is where every worker, on any machine, writes its epochs, so
the figures are exact without Prometheus' multiprocess mode (which needs one shared folder) or a push
gateway. Scraping costs four aggregate queries.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from typing import Any

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import case, func, select
from sqlalchemy.orm import Session
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import telemetry
from service.db import session_scope
from service.models import EpochMetric, Run, RunStatus

router = APIRouter(tags=["operations"])
access_log = logging.getLogger("bnlab.access")

# Epoch wall times (validation included) on the article's model run from ~0.1 s (small synthetic
# sets) to ~2 s (Fashion-MNIST on 2 cores); CNNs and large grids go to minutes.
EPOCH_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


class DatabaseCollector(Collector):
    """Runs by status, queue depth, epoch durations and training throughput, from the database."""

    def collect(self) -> Iterator[Metric]:
        with session_scope() as session:
            by_status = select(Run.status, func.count()).group_by(Run.status)
            counts = {status: int(count) for status, count in session.execute(by_status).all()}
            yield _runs_by_status(counts)
            yield _queue_depth(counts)
            yield _epoch_durations(session)
            yield _samples_per_second(session)

    def describe(self) -> Sequence[Metric]:
        return []  # collected fresh at each scrape; nothing to check at registration


def _runs_by_status(counts: dict[str, int]) -> Metric:
    runs = GaugeMetricFamily("bnlab_runs", "Runs by status.", labels=["status"])
    for status in RunStatus:
        runs.add_metric([status.value], counts.get(status.value, 0))
    return runs


def _queue_depth(counts: dict[str, int]) -> Metric:
    # The database is the queue's source of truth: a run is queued there until a worker claims it,
    # whatever the broker holds (it may have lost a message the reaper will publish again).
    gauge = GaugeMetricFamily("bnlab_queue_depth", "Runs waiting for a worker (status queued).")
    gauge.add_metric([], counts.get(RunStatus.queued.value, 0))
    return gauge


def _epoch_durations(session: Session) -> Metric:
    below = [func.coalesce(func.sum(case((EpochMetric.seconds <= b, 1), else_=0)), 0) for b in EPOCH_BUCKETS]
    row = session.execute(
        select(func.count(), func.coalesce(func.sum(EpochMetric.seconds), 0.0), *below)
    ).one()
    count, total, *cumulative = row
    buckets = [(str(b), int(c)) for b, c in zip(EPOCH_BUCKETS, cumulative, strict=True)]
    return HistogramMetricFamily(
        "bnlab_epoch_duration_seconds",
        "Wall time of every recorded training epoch (validation included), from the database.",
        buckets=[*buckets, ("+Inf", int(count))],
        sum_value=float(total),
    )


def _samples_per_second(session: Session) -> Metric:
    gauge = GaugeMetricFamily(
        "bnlab_training_samples_per_second",
        "Running runs: training samples of the last epoch / its wall time (validation included).",
        labels=["run_id"],
    )
    rows = session.execute(
        select(Run.id, EpochMetric.train_samples, EpochMetric.seconds)
        .join(EpochMetric, (EpochMetric.run_id == Run.id) & (EpochMetric.epoch == Run.epochs_done))
        .where(Run.status == RunStatus.running.value)
    ).all()
    for run_id, samples, seconds in rows:
        if samples is not None and seconds > 0:
            gauge.add_metric([run_id], samples / seconds)
    return gauge


def _database_registry() -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DatabaseCollector())
    return registry


@router.get(
    "/metrics",
    summary="Prometheus metrics: runs, queue, epochs, training throughput, HTTP and inference",
    # Not response_class=PlainTextResponse: that would document the JSON error answers as text too.
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
)
def metrics() -> PlainTextResponse:
    body = generate_latest(REGISTRY) + generate_latest(_database_registry())
    return PlainTextResponse(body, media_type=CONTENT_TYPE_LATEST)


# ---------------------------------------------------------------------------------------- middleware


def route_label(scope: Scope) -> str:
    """The route template (`/api/v1/runs/{run_id}`), never the raw path: ids would make a label per run."""
    path = getattr(scope.get("route"), "path", None)
    if isinstance(path, str):
        return path
    return "/static" if scope.get("path", "").startswith("/static/") else "unmatched"


class RequestTelemetryMiddleware:
    """X-Request-ID (the client's if plain, else a new one) in the logs and echoed back; one access
    log line and the HTTP metrics per request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        offered = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = telemetry.new_request_id(offered)
        token = telemetry.request_id_var.set(request_id)
        started = time.perf_counter()
        status, retry_after = 500, None

        async def send_with_id(message: Message) -> None:
            nonlocal status, retry_after
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = MutableHeaders(scope=message)
                headers.append("X-Request-ID", request_id)
                retry_after = headers.get("retry-after")
                telemetry.HTTP_LATENCY.labels(route_label(scope)).observe(time.perf_counter() - started)
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self._record(scope, status, started, retry_after)
            telemetry.request_id_var.reset(token)

    @staticmethod
    def _record(scope: Scope, status: int, started: float, retry_after: str | None) -> None:
        labels: dict[str, Any] = {"route": route_label(scope), "method": scope["method"]}
        labels["status"] = str(status)
        telemetry.HTTP_REQUESTS.labels(**labels).inc()
        if status >= 400:
            telemetry.HTTP_ERRORS.labels(**labels).inc()
        extra: dict[str, Any] = {
            "status": status,
            "duration_ms": round((time.perf_counter() - started) * 1000, 2),
        }
        if retry_after is not None:  # logged, so a 429 or 503 without one shows (tests/load checks 503s)
            extra["retry_after"] = retry_after
        access_log.info("%s %s %d", scope["method"], scope["path"], status, extra=extra)
