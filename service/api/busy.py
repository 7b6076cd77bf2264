"""A database too busy to answer in time is overload, not a server error: 503 with Retry-After.

With short transactions a write waits milliseconds for SQLite's lock or a pooled connection. Should
one still wait out SQLite's busy timeout or the pool's timeout (a burst far past what the machine
can take), or lose a Postgres lock race, the client is told to retry: that transaction was rolled
back (routes that publish commit before they publish, so this never hides a published run). Any
other database error stays a 500.
"""

from __future__ import annotations

from fastapi import Request, status
from fastapi.responses import Response
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException

from service.api.errors import http_error_handler

RETRY_AFTER_S = 1
# SQLite's words when it gave up waiting for a lock (SQLITE_BUSY, SQLITE_LOCKED).
SQLITE_BUSY = ("database is locked", "database table is locked", "database is busy")
# Postgres: serialization failure, deadlock detected, lock not available, too many connections.
POSTGRES_RETRY = {"40001", "40P01", "55P03", "53300"}


def is_busy(exc: BaseException) -> bool:
    """Whether `exc` means 'the database is busy, the same request may succeed later'."""
    if isinstance(exc, PoolTimeout):
        return True
    if not isinstance(exc, OperationalError):
        return False
    if getattr(exc.orig, "sqlstate", None) in POSTGRES_RETRY:
        return True
    return any(words in str(exc.orig) for words in SQLITE_BUSY)


async def database_busy_handler(request: Request, exc: Exception) -> Response:
    if not is_busy(exc):
        raise exc  # a real fault: Starlette's server-error middleware logs it and answers 500
    what = "a database connection" if isinstance(exc, PoolTimeout) else "the database"
    busy = HTTPException(
        status.HTTP_503_SERVICE_UNAVAILABLE,
        detail=f"the server is busy: {what} was not free in time; retry shortly",
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )
    return await http_error_handler(request, busy)


BUSY_ERRORS: tuple[type[Exception], ...] = (OperationalError, PoolTimeout)
