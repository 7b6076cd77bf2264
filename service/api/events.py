"""Live progress as Server-Sent Events: GET /api/v1/runs/{id}/events.

A run's events come from the database, polled every POLL_INTERVAL_S inside the stream, so they work
the same on SQLite and Postgres with no broker or pub/sub: an `epoch` event per recorded epoch and a
`status` event per change of status observed. The stream ends after a finished status.

Event ids are a cursor, `<epochs seen>:<status seen>` (e.g. `3:running`): a client reconnecting with
`Last-Event-ID: 3:running` gets exactly the epochs after 3 and the status if it is no longer
`running`. Epoch rows are append-only (a resumed run re-trains only epochs that were never recorded),
so nothing is sent twice or skipped.

Each poll is one short transaction in the thread pool; between polls the stream holds neither a
database connection nor a thread (it sleeps on the event loop), and it stops as soon as the client
disconnects. A stream also ends after MAX_STREAM_S; clients reconnect with their Last-Event-ID.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Header, HTTPException, Request, status
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from service import crud, telemetry
from service.api.deps import RunIdPath
from service.db import session_scope
from service.models import RunStatus
from service.schemas import EpochMetricPublic, RunCreate

router = APIRouter(prefix="/api/v1/runs", tags=["runs"])

POLL_INTERVAL_S = 0.5
KEEPALIVE_S = 15.0  # a comment line, so proxies keep the connection and a gone client is noticed
MAX_STREAM_S = 600.0
RETRY_MS = 2000  # how long an EventSource waits before reconnecting

EVENT_ID_PATTERN = r"^\d{1,9}:(|queued|running|succeeded|failed|cancelled)$"
EVENTS_DESCRIPTION = (
    "`text/event-stream`. Events: `status` (data: `{status, error, epochs_done, epochs_total}`) on each "
    "change of status, `epoch` (data: the epoch's metrics and `epochs_total`) per recorded epoch. "
    "Event ids are `<epochs seen>:<status seen>`; send the last one as `Last-Event-ID` to resume "
    "exactly there. The stream ends after a finished status (succeeded, failed, cancelled)."
)
SSE_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {"description": "The event stream", "content": {"text/event-stream": {"schema": {"type": "string"}}}}
}


@dataclass
class Cursor:
    """What the client has been sent: epochs up to `epoch`, and `status` ('' before any)."""

    epoch: int = 0
    status: str = ""

    @classmethod
    def parse(cls, last_event_id: str | None) -> Cursor:
        """An id this stream sent (the route's header pattern has checked its form), or a fresh start."""
        if not last_event_id:
            return cls()
        epoch, seen = last_event_id.split(":")
        return cls(int(epoch), seen)

    @property
    def id(self) -> str:
        return f"{self.epoch}:{self.status}"


def sse(event: str, event_id: str, data: dict[str, Any]) -> str:
    return f"id: {event_id}\nevent: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


@dataclass
class Snapshot:
    status: str
    error: str | None
    epochs_total: int
    new_epochs: list[dict[str, Any]]


def read_snapshot(run_id: str, after_epoch: int) -> Snapshot | None:
    """The run's status, then the epochs after `after_epoch`, in that order: a run seen finished has
    all its epochs committed already, so the last epochs are never lost to a race with the worker."""
    with session_scope() as session:
        run = crud.get_run(session=session, run_id=run_id)
        if run is None:
            return None
        epochs_total = RunCreate.model_validate(run.spec).train.epochs
        rows = crud.list_epoch_metrics(session=session, run_id=run_id, after_epoch=after_epoch)
        epochs = [EpochMetricPublic.model_validate(row).model_dump(mode="json") for row in rows]
        return Snapshot(run.status, run.error, epochs_total, epochs)


def events_for(snapshot: Snapshot, cursor: Cursor) -> list[str]:
    """The events that bring a client at `cursor` up to `snapshot`, advancing the cursor.

    A live status comes before the epochs recorded under it; a finished status comes after the last
    epochs, so a client reads the whole curve before it learns the run ended."""
    events: list[str] = []

    def status_event() -> None:
        cursor.status = snapshot.status
        data = {
            "status": snapshot.status,
            "error": snapshot.error,
            "epochs_done": cursor.epoch,
            "epochs_total": snapshot.epochs_total,
        }
        events.append(sse("status", cursor.id, data))

    changed = snapshot.status != cursor.status
    finished = RunStatus(snapshot.status).is_finished
    if changed and not finished:
        status_event()
    for epoch in snapshot.new_epochs:
        cursor.epoch = epoch["epoch"]
        events.append(sse("epoch", cursor.id, epoch | {"epochs_total": snapshot.epochs_total}))
    if changed and finished:
        status_event()
    return events


async def run_events(request: Request, run_id: str, cursor: Cursor, first: Snapshot) -> AsyncIterator[str]:
    with telemetry.EVENT_STREAMS.track_inprogress():
        async for event in _run_events(request, run_id, cursor, first):
            yield event


async def _run_events(request: Request, run_id: str, cursor: Cursor, first: Snapshot) -> AsyncIterator[str]:
    yield f"retry: {RETRY_MS}\n\n"
    started = last_sent = time.monotonic()
    snapshot: Snapshot | None = first
    while snapshot is not None:  # None: the run was deleted while streaming
        for event in events_for(snapshot, cursor):
            yield event
            last_sent = time.monotonic()
        if RunStatus(snapshot.status).is_finished or time.monotonic() - started >= MAX_STREAM_S:
            return
        if time.monotonic() - last_sent >= KEEPALIVE_S:
            yield ": keepalive\n\n"
            last_sent = time.monotonic()
        await asyncio.sleep(POLL_INTERVAL_S)
        if await request.is_disconnected():
            return
        snapshot = await run_in_threadpool(read_snapshot, run_id, cursor.epoch)


@router.get(
    "/{run_id}/events",
    summary="Live progress of a run as Server-Sent Events (one per epoch and per status change)",
    description=EVENTS_DESCRIPTION,
    response_class=StreamingResponse,
    responses=SSE_RESPONSE,
)
async def stream_run_events(
    request: Request,
    run_id: RunIdPath,
    last_event_id: Annotated[
        str | None,
        Header(
            alias="Last-Event-ID",
            pattern=EVENT_ID_PATTERN,
            description="Resume after this event id (sent by EventSource on reconnect).",
        ),
    ] = None,
) -> StreamingResponse:
    # No session dependency: a request-scoped session would hold its connection for the whole stream.
    cursor = Cursor.parse(last_event_id)
    first = await run_in_threadpool(read_snapshot, run_id, cursor.epoch)
    if first is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"run {run_id} not found")
    return event_stream(run_events(request, run_id, cursor, first))


def event_stream(events: AsyncIterator[str]) -> StreamingResponse:
    # no-cache and no proxy buffering: each event must reach the client when it is written.
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(events, media_type="text/event-stream", headers=headers)
