"""Limits that keep one client or a burst from taking the service down.

- a cap on requests in flight, and a bounded queue behind it: a request past the cap waits, in order
  of arrival, for a slot; past the queue too the API answers 503 with Retry-After at once. Event
  streams (SSE, open for as long as a run trains) have a cap of their own, so that open dashboards
  never use up the slots of ordinary requests; a request that waits longer than `max_queue_wait_s`
  gets 503 with Retry-After too. The liveness probes are never counted, queued nor refused; the
  readiness probes are (they use a thread and a database connection, and they are public);
- a token bucket per API key (per caller on a keyless loopback server): 429 with Retry-After;
- a thread in the pool for every request and stream admitted (see ensure_threads).
The body-size cap is Starlette's RequestBodyLimitMiddleware (413, chunked bodies included).
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
from collections import deque
from dataclasses import dataclass

import anyio.to_thread
from fastapi import HTTPException, Request, status
from starlette.types import ASGIApp, Receive, Scope, Send

from service.auth import Principal
from service.config import get_settings

# The Server-Sent Events routes (api/events.py): /api/v1/runs/{id}/events, /api/v1/experiments/{id}/events.
EVENT_STREAM_SUFFIX = "/events"


# The liveness probes: an orchestrator that gets a 503 from a busy server would restart it, so they
# bypass the cap. They are async and touch nothing (no thread, no connection), so a flood of them
# costs little. The readiness probes are not exempt: they are sync, open a database connection and
# reach the broker, and they are public (no rate limit); under the cap, a flood of them waits like any
# request instead of taking a thread and a connection each. A busy server answering 503 to a readiness
# probe is taken out of rotation, not restarted, which is what a readiness probe is for.
LIVENESS_PATHS = frozenset({"/health/live", "/v2/health/live"})


class ConcurrencyLimitMiddleware:
    """At most `max_in_flight` HTTP requests served at once; up to `max_queued` more wait, first come
    first served, for a slot, up to `max_queue_wait_s` seconds each; past the queue, or past that
    wait, a request gets 503 with Retry-After. An event stream
    answers 503 when `max_streams` streams are already open; streams do not count as requests."""

    def __init__(
        self,
        app: ASGIApp,
        max_in_flight: int,
        max_streams: int,
        max_queued: int = 0,
        max_queue_wait_s: float = 30.0,
    ) -> None:
        self.app, self.max_in_flight, self.max_streams = app, max_in_flight, max_streams
        self.max_queued, self.max_queue_wait_s = max_queued, max_queue_wait_s
        self.in_flight = 0  # the event loop is single-threaded: no lock needed
        self.streams = 0
        self._waiting: deque[asyncio.Future[None]] = deque()
        self._threads_sized_for: asyncio.AbstractEventLoop | None = None  # once per event loop

    @property
    def queued(self) -> int:
        return len(self._waiting)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        if loop is not self._threads_sized_for:
            ensure_threads(self.max_in_flight + self.max_streams)
            self._threads_sized_for = loop
        path = str(scope.get("path", ""))
        if path in LIVENESS_PATHS:
            await self.app(scope, receive, send)
            return
        if path.endswith(EVENT_STREAM_SUFFIX):
            await self._stream(scope, receive, send)
            return
        if self.in_flight >= self.max_in_flight:
            if len(self._waiting) >= self.max_queued:
                await _unavailable(send, "the server is at its concurrency limit; retry shortly")
                return
            # The slot is handed over by the request that leaves it.
            if not await self._wait_for_slot():
                await _unavailable(
                    send,
                    f"the server is at its concurrency limit and no slot freed up in "
                    f"{self.max_queue_wait_s:g} s; retry shortly",
                )
                return
        else:
            self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self._release()

    async def _wait_for_slot(self) -> bool:
        """Wait in the queue for a slot: True once handed one, False after `max_queue_wait_s`."""
        slot: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append(slot)
        try:
            async with asyncio.timeout(self.max_queue_wait_s):
                await slot
        except TimeoutError:
            self._leave_queue(slot)
            return False
        except asyncio.CancelledError:  # the client left while waiting
            self._leave_queue(slot)
            raise
        return True

    def _leave_queue(self, slot: asyncio.Future[None]) -> None:
        if slot.done() and not slot.cancelled():
            self._release()  # handed a slot in the same instant: pass it on
        elif slot in self._waiting:  # (a cancelled slot may already have been skipped)
            self._waiting.remove(slot)

    def _release(self) -> None:
        """Hand the slot to the longest-waiting request, or free it."""
        while self._waiting:
            slot = self._waiting.popleft()
            if not slot.done():
                slot.set_result(None)
                return
        self.in_flight -= 1

    async def _stream(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.streams >= self.max_streams:
            await _unavailable(
                send, f"{self.max_streams} event streams are open, the server's limit; close one or retry"
            )
            return
        self.streams += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.streams -= 1


def ensure_threads(needed: int) -> None:
    """At least `needed` threads in this event loop's pool (anyio's default is 40).

    A sync route's request session keeps its transaction (on SQLite the write lock, on Postgres a
    pooled connection) until FastAPI has validated the route's answer, and FastAPI does that on a
    second trip to the thread pool. With 40 threads, 40 requests waiting for that lock or connection
    left its holder waiting for a thread: nothing moved until SQLite's busy timeout or the pool's
    timeout ended the wait with a 500 (issue 20). Each admitted request or stream uses one thread at
    a time, so with one per admission a holder never waits for a thread. Threads start on demand."""
    limiter = anyio.to_thread.current_default_thread_limiter()
    if limiter.total_tokens < needed:
        limiter.total_tokens = needed


async def _unavailable(send: Send, detail: str) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status.HTTP_503_SERVICE_UNAVAILABLE,
            "headers": [(b"content-type", b"application/json"), (b"retry-after", b"1")],
        }
    )
    await send({"type": "http.response.body", "body": json.dumps({"detail": detail, "errors": []}).encode()})


@dataclass
class Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """A token bucket per caller: `burst` requests at once, refilled at `per_minute`."""

    def __init__(self, per_minute: int, burst: int) -> None:
        self.rate, self.burst = per_minute / 60.0, float(burst)
        self._buckets: dict[str, Bucket] = {}
        self._lock = threading.Lock()

    def wait_time(self, caller: str) -> float:
        """0 if the request may go ahead (and take a token), else seconds until a token is there."""
        now = time.monotonic()
        with self._lock:
            bucket = self._buckets.setdefault(caller, Bucket(self.burst, now))
            bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated) * self.rate)
            bucket.updated = now
            if bucket.tokens >= 1:
                bucket.tokens -= 1
                return 0.0
            return (1 - bucket.tokens) / self.rate


def enforce_rate_limit(request: Request, principal: Principal) -> None:
    """429 with Retry-After when `principal` has used up its bucket (an in-memory bucket under a
    short lock, so on the event loop)."""
    limiter: RateLimiter = request.app.state.rate_limiter
    wait = limiter.wait_time(principal.name)
    if wait > 0:
        raise HTTPException(
            status.HTTP_429_TOO_MANY_REQUESTS,
            detail="rate limit exceeded for this key",
            headers={"Retry-After": str(math.ceil(wait))},
        )


def new_rate_limiter() -> RateLimiter:
    settings = get_settings()
    return RateLimiter(settings.rate_limit_per_minute, settings.rate_limit_burst)
