"""Request-scoped dependencies as typed aliases, so routes read like prose."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Annotated

from fastapi import Depends, HTTPException, Path, Query, Request, status
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.orm import Session

from service.config import Settings, get_settings
from service.db import session_scope
from service.experiments import repository as experiment_repo
from service.models import Run
from service.runs import repository as run_repo

# Server-generated ids: 32 hex digits (uuid4().hex).
ID_LENGTH = 32


# Requests that never write: their session reads a snapshot without taking SQLite's write lock.
READ_METHODS = frozenset({"GET", "HEAD"})


def get_db(request: Request) -> Iterator[Session]:
    """The request owns the transaction: commit when the route returns, roll back when it raises.

    Function-scoped (below): the commit runs before the response is sent, not after, so a client
    never gets a 2xx for a write that then failed to commit, and a transaction (on SQLite, the
    database's write lock) is never held while the answer travels to a slow client.

    A GET reads without the write lock: every request's session took it, so a dashboard or a script
    polling a 20-run experiment every 50 ms held up the worker's writes (a grid's training processes
    waited 6-8 ms a run for it, measured with bench/train.py --grid)."""
    with session_scope(read_only=request.method in READ_METHODS) as session:
        yield session


SessionDep = Annotated[Session, Depends(get_db, scope="function")]
SettingsDep = Annotated[Settings, Depends(get_settings)]
RunIdPath = Annotated[
    str,
    Path(pattern=r"^[0-9a-f]{6,32}$", description="A run id (32 hex), or a unique prefix of 6 or more."),
]
ExperimentIdPath = Annotated[
    str,
    Path(
        pattern=r"^[0-9a-f]{6,32}$", description="An experiment id (32 hex), or a unique prefix of 6 or more."
    ),
]
# How many matches an ambiguous prefix's 409 lists.
PREFIX_MATCHES_SHOWN = 10


def full_id(kind: str, given: str, matching: Callable[[Session, str, int], list[str]]) -> str:
    """The whole id for `given` (a whole id or a prefix); 409 naming the matches when it is ambiguous.

    An unknown prefix is returned as given, so the route's lookup answers its usual 404. The lookup
    has a session of its own, closed at once: the request's session has not begun yet."""
    if len(given) == ID_LENGTH:
        return given
    with session_scope(read_only=True) as session:
        matches = matching(session, given, PREFIX_MATCHES_SHOWN + 1)
    if len(matches) > 1:
        shown = ", ".join(matches[:PREFIX_MATCHES_SHOWN])
        more = " and more" if len(matches) > PREFIX_MATCHES_SHOWN else ""
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            detail=f"{kind} id prefix {given} is ambiguous: it matches {shown}{more}; give more characters",
        )
    return matches[0] if matches else given


def run_id_for(given: str) -> str:
    return full_id("run", given, lambda s, p, n: run_repo.run_ids_with_prefix(session=s, prefix=p, limit=n))


def experiment_id_for(given: str) -> str:
    return full_id(
        "experiment",
        given,
        lambda s, p, n: experiment_repo.experiment_ids_with_prefix(session=s, prefix=p, limit=n),
    )


async def resolved_id(given: str, lookup: Callable[[str], str]) -> str:
    """`lookup(given)` in a thread for a prefix; a whole id (what scripts and the serving path send)
    as it is, in the dependency itself: a sync dependency would cost every request two thread hand-offs."""
    return given if len(given) == ID_LENGTH else await run_in_threadpool(lookup, given)


async def resolve_run_id(run_id: RunIdPath) -> str:
    return await resolved_id(run_id, run_id_for)


async def resolve_experiment_id(experiment_id: ExperimentIdPath) -> str:
    return await resolved_id(experiment_id, experiment_id_for)


RunId = Annotated[str, Depends(resolve_run_id)]
ExperimentId = Annotated[str, Depends(resolve_experiment_id)]

# Pagination of every list route (runs, experiments, datasets).
LimitQuery = Annotated[int, Query(ge=1, le=100, description="Items per page.")]
OffsetQuery = Annotated[int, Query(ge=0, le=1_000_000, description="Items to skip.")]


def get_run_or_404(run_id: RunId, session: SessionDep) -> Run:
    run = run_repo.get_run(session=session, run_id=run_id)
    if run is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"run {run_id} not found")
    return run


RunDep = Annotated[Run, Depends(get_run_or_404)]
