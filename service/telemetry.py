"""Structured logs and the in-process Prometheus metrics.

Logs are one JSON object per line with the request id (API) or the run id (worker) of the work that
wrote them, read from context variables that the request middleware and the training task set.

Metrics: what only this process sees is recorded here as it happens (HTTP requests by route, model
inference); what lives in the database — runs by status, the queue, epoch durations, training
throughput — is read from it at scrape time (service.api.metrics), so training figures from workers on
any machine are exact without a shared folder or a push gateway.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

request_id_var: ContextVar[str | None] = ContextVar("bnlab_request_id", default=None)
run_id_var: ContextVar[str | None] = ContextVar("bnlab_run_id", default=None)

# A client's X-Request-ID is kept only if it is short and plain, so it can go into logs and headers as-is.
REQUEST_ID_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,64}$")

# LogRecord's own attributes; anything else on a record came from `extra=` and is logged as a field.
_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


def new_request_id(offered: str | None) -> str:
    return offered if offered and REQUEST_ID_PATTERN.match(offered) else uuid.uuid4().hex


@contextmanager
def run_context(run_id: str) -> Iterator[None]:
    """Every log line written inside carries `run_id`."""
    token = run_id_var.set(run_id)
    try:
        yield
    finally:
        run_id_var.reset(token)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, var in (("request_id", request_id_var), ("run_id", run_id_var)):
            value = var.get()
            if value is not None:
                entry[key] = value
        entry |= {k: v for k, v in vars(record).items() if k not in _STANDARD_ATTRS and not k.startswith("_")}
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def logging_config(level: str, fmt: str) -> dict[str, Any]:
    """A dictConfig for the root logger and uvicorn's loggers (which otherwise keep their own format)."""
    formatter: dict[str, Any] = {"()": JsonFormatter} if fmt == "json" else {"format": TEXT_FORMAT}
    handler = {"class": "logging.StreamHandler", "formatter": "main", "stream": "ext://sys.stderr"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"main": formatter},
        "handlers": {"main": handler},
        "root": {"handlers": ["main"], "level": level.upper()},
        "loggers": {
            name: {"handlers": [], "propagate": True, "level": level.upper()}
            for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "celery")
        },
    }


def configure_logging(level: str, fmt: str) -> None:
    import logging.config

    logging.config.dictConfig(logging_config(level, fmt))


# ---------------------------------------------------------------------------------------- metrics

# Latency buckets for the API (seconds): a cached model answers in a few ms; a first load takes longer.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

HTTP_REQUESTS = Counter(
    "bnlab_http_requests", "HTTP requests answered, by route template, method and status.",
    ["route", "method", "status"],
)  # fmt: skip
HTTP_ERRORS = Counter(
    "bnlab_http_errors", "HTTP answers with a 4xx or 5xx status, by route template, method and status.",
    ["route", "method", "status"],
)  # fmt: skip
HTTP_LATENCY = Histogram(
    "bnlab_http_request_duration_seconds", "Time to the response's start, by route template.",
    ["route"], buckets=LATENCY_BUCKETS,
)  # fmt: skip
INFERENCE_REQUESTS = Counter(
    "bnlab_inference_requests", "Inference requests, by model (run id) and outcome (ok or error).",
    ["model", "outcome"],
)  # fmt: skip
INFERENCE_LATENCY = Histogram(
    "bnlab_inference_latency_seconds", "Time per inference request, batcher queueing included, by model.",
    ["model"], buckets=LATENCY_BUCKETS,
)  # fmt: skip
INFERENCE_BATCH_SIZE = Histogram(
    "bnlab_inference_batch_requests", "Requests per micro-batch (one forward pass), by model.",
    ["model"], buckets=BATCH_BUCKETS,
)  # fmt: skip
EVENT_STREAMS = Gauge("bnlab_event_streams", "Server-Sent Event streams open now.")

# A name that resolved to no model: counted under this label, not the client's text (label values
# chosen by clients would let anyone grow the metric without bound).
UNRESOLVED_MODEL = "unresolved"
