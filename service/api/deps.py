"""Request-scoped dependencies as typed aliases, so routes read like prose."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, HTTPException, Path, Query, status
from sqlalchemy.orm import Session

from service import crud
from service.config import Settings, get_settings
from service.db import new_session
from service.models import Run


def get_db() -> Iterator[Session]:
    """The request owns the transaction: commit when the route returns, roll back when it raises.

    Function-scoped (below): the commit runs before the response is sent, not after, so a client
    never gets a 2xx for a write that then failed to commit, and a transaction (on SQLite, the
    database's write lock) is never held while the answer travels to a slow client."""
    session = new_session()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


SessionDep = Annotated[Session, Depends(get_db, scope="function")]
SettingsDep = Annotated[Settings, Depends(get_settings)]
RunIdPath = Annotated[str, Path(pattern=r"^[0-9a-f]{32}$", description="Server-generated run id (32 hex).")]
ExperimentIdPath = Annotated[
    str, Path(pattern=r"^[0-9a-f]{32}$", description="Server-generated experiment id (32 hex).")
]
# Pagination of every list route (runs, experiments, datasets).
LimitQuery = Annotated[int, Query(ge=1, le=100, description="Items per page.")]
OffsetQuery = Annotated[int, Query(ge=0, le=1_000_000, description="Items to skip.")]


def get_run_or_404(run_id: RunIdPath, session: SessionDep) -> Run:
    run = crud.get_run(session=session, run_id=run_id)
    if run is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"run {run_id} not found")
    return run


RunDep = Annotated[Run, Depends(get_run_or_404)]
