"""Liveness and readiness probes."""

from __future__ import annotations

from fastapi import APIRouter, Response, status
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from service.api.security import PUBLIC
from service.db import session_scope
from service.queue import broker_reachable

router = APIRouter(prefix="/health", tags=["health"])


@router.get("/live", summary="The process is up", openapi_extra=PUBLIC)
async def live() -> dict[str, str]:  # async: a sync route costs two thread hand-offs a probe
    return {"status": "ok"}


def database_reachable() -> bool:
    try:
        # Read only: a readiness probe never waits behind a worker's write (SQLite's write lock).
        with session_scope(read_only=True) as session:
            session.execute(text("SELECT 1"))
    except SQLAlchemyError:
        return False
    return True


@router.get("/ready", summary="The database and the broker are reachable", openapi_extra=PUBLIC)
def ready(response: Response) -> dict[str, str]:
    checks = {"database": database_reachable(), "broker": broker_reachable()}
    if not all(checks.values()):
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    return {"status": "ok" if all(checks.values()) else "unavailable"} | {
        name: "ok" if ok else "unreachable" for name, ok in checks.items()
    }
