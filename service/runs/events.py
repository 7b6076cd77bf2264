"""Live progress as Server-Sent Events: GET /api/v1/runs/{id}/events and
GET /api/v1/experiments/{id}/events.

Events come from the database, polled inside the stream (see `poll_interval`), so they work the same
on SQLite and Postgres with no broker or pub/sub: an `epoch` event per recorded epoch and a `status`
event per change of a run's status. A run's stream ends after its finished status; an experiment's
after an `end` event, once every run has finished.

Event ids are cursors: a run's is `<epochs seen>:<status seen>` (e.g. `3:running`); an experiment's
lists one `<epochs seen><status letter>` per run, in the experiment's run order (e.g. `3r.2r.0q`).
A client reconnecting with `Last-Event-ID` gets exactly the epochs after the ones it has and the
statuses that changed since. Epoch rows are append-only (a resumed run re-trains only epochs that
were never recorded), so nothing is sent twice or skipped.

Each poll is one short transaction in the thread pool; between polls a stream holds neither a
database connection nor a thread (it sleeps on the event loop), and it stops as soon as the client
disconnects. A stream also ends after MAX_STREAM_S; clients reconnect with their Last-Event-ID.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated, Any, Protocol

from fastapi import APIRouter, Header, HTTPException, Request, status
from fastapi.responses import StreamingResponse
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from service import telemetry
from service.api.deps import ExperimentId, RunId
from service.db import session_scope
from service.experiments import grid
from service.experiments import repository as experiment_repo
from service.models import Run, RunStatus
from service.runs import repository as run_repo
from service.runs.schemas import EpochMetricPublic

router = APIRouter(tags=["events"])

# A stream polls every MIN_POLL_S while few are open, so a client learns of an epoch or a run's end
# within about a tenth of a second (with a fixed 0.5 s, `bnlab submit --wait` exited 0.47-0.54 s after
# the run had finished: up to 9 % of the article's 5.8 s pair). A poll costs the API process about
# 1.1 ms of CPU (50 streams at 0.1 s on SQLite measured 0.57 CPU s a second), so with many streams
# open the interval grows: one API process polls at most POLL_BUDGET_PER_S times a second, a
# quarter of a core at most, leaving the cores to training (the default cap of 256 streams then
# polls each once a second).
MIN_POLL_S = 0.1
POLL_BUDGET_PER_S = 256
KEEPALIVE_S = 15.0  # a comment line, so proxies keep the connection and a gone client is noticed
MAX_STREAM_S = 600.0
RETRY_MS = 2000  # how long an EventSource waits before reconnecting

RUN_EVENT_ID = r"^\d{1,9}:(|queued|running|succeeded|failed|cancelled)$"
# One letter per status in experiment cursors, so 64 runs fit in a short header.
LETTERS = {"": "-", "queued": "q", "running": "r", "succeeded": "s", "failed": "f", "cancelled": "c"}
STATUSES = {letter: name for name, letter in LETTERS.items()}
# `!` at the end: the `end` event, so that a client that has it is sent nothing more.
EXPERIMENT_EVENT_ID = r"^\d{1,9}[-qrsfc](\.\d{1,9}[-qrsfc]){0,63}!?$"

SSE_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {"description": "The event stream", "content": {"text/event-stream": {"schema": {"type": "string"}}}}
}
RUN_EVENTS_DESCRIPTION = (
    "`text/event-stream`. Events: `status` (data: `{status, error, epochs_done, epochs_total}`) on each "
    "change of status, `epoch` (data: the epoch's metrics and `epochs_total`) per recorded epoch. "
    "Event ids are `<epochs seen>:<status seen>`; send the last one as `Last-Event-ID` to resume "
    "exactly there. The stream ends after a finished status (succeeded, failed, cancelled)."
)
EXPERIMENT_EVENTS_DESCRIPTION = (
    "`text/event-stream`. The run events of every run of the experiment (as `/runs/{id}/events`, each "
    "with `run_id`, `config` and `seed`), then `end` (data: `{status_counts}`) once all have finished, "
    "and the stream ends. Event ids list each run's cursor in run order (`3r.2r.0q`; `!` ends the id "
    "of `end`); send the last one as `Last-Event-ID` to resume exactly there."
)


@dataclass
class Cursor:
    """What a client has been sent about one run: epochs up to `epoch`, and `status` ('' before any)."""

    epoch: int = 0
    status: str = ""


@dataclass
class Snapshot:
    status: str
    error: str | None
    epochs_total: int
    new_epochs: list[dict[str, Any]]


def sse(event: str, event_id: str, data: dict[str, Any]) -> str:
    return f"id: {event_id}\nevent: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def events_for(
    snapshot: Snapshot,
    cursor: Cursor,
    event_id: Callable[[], str],
    extra: dict[str, Any] | None = None,
) -> list[str]:
    """The events that bring a client at `cursor` up to `snapshot`, advancing the cursor; each id is
    `event_id()` taken after the cursor moved.

    A live status comes before the epochs recorded under it; a finished status comes after the last
    epochs, so a client reads the whole curve before it learns the run ended."""
    extra = extra or {}
    events: list[str] = []

    def status_event() -> None:
        cursor.status = snapshot.status
        data = {"status": snapshot.status, "error": snapshot.error, "epochs_done": cursor.epoch}
        events.append(sse("status", event_id(), extra | data | {"epochs_total": snapshot.epochs_total}))

    changed = snapshot.status != cursor.status
    finished = RunStatus(snapshot.status).is_finished
    if changed and not finished:
        status_event()
    for epoch in snapshot.new_epochs:
        cursor.epoch = epoch["epoch"]
        events.append(sse("epoch", event_id(), extra | epoch | {"epochs_total": snapshot.epochs_total}))
    if changed and finished:
        status_event()
    return events


def snapshot_of(session: Session, run: Run, after_epoch: int) -> Snapshot:
    """The run's status (already read), then the epochs after `after_epoch`, in that order: a run seen
    finished has all its epochs committed already, so the last ones are never lost to a race."""
    new = []
    if run.epochs_done > after_epoch:
        rows = run_repo.list_epoch_metrics(session=session, run_id=run.id, after_epoch=after_epoch)
        new = [EpochMetricPublic.model_validate(row).model_dump(mode="json") for row in rows]
    return Snapshot(run.status, run.error, int(run.spec["train"]["epochs"]), new)


class OpenStreams:
    """How many streams this process has open: they all live on its one event loop, so a plain count
    needs no lock."""

    count = 0

    @classmethod
    @contextmanager
    def one_more(cls) -> Iterator[None]:
        cls.count += 1
        try:
            yield
        finally:
            cls.count -= 1


def poll_interval(open_streams: int) -> float:
    """Seconds between a stream's polls while `open_streams` streams are open in this process."""
    return max(MIN_POLL_S, open_streams / POLL_BUDGET_PER_S)


async def poll_until_done(
    request: Request,
    poll: Callable[[], Awaitable[list[str] | None]],
    first: list[str],
    done: Callable[[], bool],
) -> AsyncIterator[str]:
    """The stream's loop: send, sleep on the event loop, poll again; ends when `done()`, when the
    client has gone, or after MAX_STREAM_S."""
    with telemetry.EVENT_STREAMS.track_inprogress(), OpenStreams.one_more():
        yield f"retry: {RETRY_MS}\n\n"
        started = last_sent = time.monotonic()
        batch: list[str] | None = first
        while batch is not None:  # None: the run or experiment was deleted while streaming
            for event in batch:
                yield event
                last_sent = time.monotonic()
            if done() or time.monotonic() - started >= MAX_STREAM_S:
                return
            if time.monotonic() - last_sent >= KEEPALIVE_S:
                yield ": keepalive\n\n"
                last_sent = time.monotonic()
            await asyncio.sleep(poll_interval(OpenStreams.count))
            if await request.is_disconnected():
                return
            batch = await poll()


def event_stream(events: AsyncIterator[str]) -> StreamingResponse:
    # no-cache and no proxy buffering: each event must reach the client when it is written.
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(events, media_type="text/event-stream", headers=headers)


def last_event_id_header(pattern: str) -> Any:
    return Header(
        alias="Last-Event-ID",
        pattern=pattern,
        description="Resume after this event id (the last one received; EventSource sends it on reconnect).",
    )


class Stream(Protocol):
    finished: bool

    def poll(self) -> list[str] | None: ...


async def _open(request: Request, stream: Stream, what: str) -> StreamingResponse:
    """The first poll decides 404 before any byte is sent; later polls run in the thread pool.
    No session dependency: a request-scoped session would hold its connection for the whole stream."""
    first = await run_in_threadpool(stream.poll)
    if first is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"{what} not found")
    poll = functools.partial(run_in_threadpool, stream.poll)
    return event_stream(poll_until_done(request, poll, first, lambda: stream.finished))


# ---------------------------------------------------------------------------------------- runs


class RunStream:
    def __init__(self, run_id: str, last_event_id: str | None) -> None:
        self.run_id = run_id
        epoch, _, seen = (last_event_id or "0:").partition(":")
        self.cursor = Cursor(int(epoch), seen)
        self.finished = False

    def event_id(self) -> str:
        return f"{self.cursor.epoch}:{self.cursor.status}"

    def poll(self) -> list[str] | None:
        with session_scope(read_only=True) as session:
            run = run_repo.get_run(session=session, run_id=self.run_id)
            if run is None:
                return None
            snapshot = snapshot_of(session, run, self.cursor.epoch)
        self.finished = RunStatus(snapshot.status).is_finished
        return events_for(snapshot, self.cursor, self.event_id)


@router.get(
    "/api/v1/runs/{run_id}/events",
    summary="Live progress of a run as Server-Sent Events (one per epoch and per status change)",
    description=RUN_EVENTS_DESCRIPTION,
    response_class=StreamingResponse,
    responses=SSE_RESPONSE,
)
async def stream_run_events(
    request: Request,
    run_id: RunId,
    last_event_id: Annotated[str | None, last_event_id_header(RUN_EVENT_ID)] = None,
) -> StreamingResponse:
    return await _open(request, RunStream(run_id, last_event_id), f"run {run_id}")


# ---------------------------------------------------------------------------------------- experiments


class ExperimentStream:
    def __init__(self, experiment_id: str, last_event_id: str | None) -> None:
        self.experiment_id = experiment_id
        self.last_event_id = (last_event_id or "").removesuffix("!")
        self.end_sent = bool(last_event_id and last_event_id.endswith("!"))
        self.cursors: list[Cursor] | None = None  # one per run, in the experiment's run order
        self.finished = False

    def event_id(self) -> str:
        assert self.cursors is not None
        return ".".join(f"{c.epoch}{LETTERS[c.status]}" for c in self.cursors)

    def _start(self, runs: int) -> list[Cursor]:
        if not self.last_event_id:
            return [Cursor() for _ in range(runs)]
        parts = self.last_event_id.split(".")
        if len(parts) != runs:
            raise HTTPException(
                status.HTTP_422_UNPROCESSABLE_CONTENT,
                detail=f"Last-Event-ID has {len(parts)} run cursors; this experiment has {runs} runs",
            )
        return [Cursor(int(part[:-1]), STATUSES[part[-1]]) for part in parts]

    def poll(self) -> list[str] | None:
        with session_scope(read_only=True) as session:
            if experiment_repo.get_experiment(session=session, experiment_id=self.experiment_id) is None:
                return None
            runs = experiment_repo.list_experiment_runs(session=session, experiment_id=self.experiment_id)
            self.cursors = self.cursors or self._start(len(runs))
            snapshots = [
                snapshot_of(session, run, c.epoch) for run, c in zip(runs, self.cursors, strict=True)
            ]
        events: list[str] = []
        for run, snapshot, cursor in zip(runs, snapshots, self.cursors, strict=True):
            events += events_for(snapshot, cursor, self.event_id, self._about(run))
        self.finished = all(RunStatus(s.status).is_finished for s in snapshots)
        if self.finished and not self.end_sent:
            counts = {s.value: sum(snap.status == s.value for snap in snapshots) for s in RunStatus}
            events.append(sse("end", self.event_id() + "!", {"status_counts": counts}))
            self.end_sent = True
        return events

    @staticmethod
    def _about(run: Run) -> dict[str, Any]:
        point = run.grid_point or {}
        seed = int(run.spec["train"]["seed"])
        return {
            "run_id": run.id,
            "config": grid.config_label(point),
            "seed": seed,
            "grid_point": point,
        }


@router.get(
    "/api/v1/experiments/{experiment_id}/events",
    summary="Live progress of every run of an experiment as Server-Sent Events",
    description=EXPERIMENT_EVENTS_DESCRIPTION,
    response_class=StreamingResponse,
    responses=SSE_RESPONSE,
)
async def stream_experiment_events(
    request: Request,
    experiment_id: ExperimentId,
    last_event_id: Annotated[str | None, last_event_id_header(EXPERIMENT_EVENT_ID)] = None,
) -> StreamingResponse:
    return await _open(request, ExperimentStream(experiment_id, last_event_id), f"experiment {experiment_id}")
