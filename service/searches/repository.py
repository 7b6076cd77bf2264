"""Data functions for searches and their trials; the caller owns the transaction."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from service.models import Run, Search, SearchTrial, utcnow

ACTIVE = "running"


def create_search(*, session: Session, name: str, spec: dict[str, Any], owner: str | None) -> Search:
    search = Search(name=name, spec=spec, owner=owner, status=ACTIVE, study_name="", trials_asked=0, pokes=0)
    session.add(search)
    session.flush()
    search.study_name = f"bnlab-search-{search.id}"
    return search


def get_search(*, session: Session, search_id: str, lock: bool = False) -> Search | None:
    return session.get(Search, search_id, with_for_update=lock)


def search_ids_with_prefix(*, session: Session, prefix: str, limit: int) -> list[str]:
    query = select(Search.id).where(Search.id.startswith(prefix)).order_by(Search.id).limit(limit)
    return list(session.scalars(query))


def list_searches(*, session: Session, limit: int, offset: int) -> tuple[Sequence[Search], int]:
    total = session.scalar(select(func.count()).select_from(Search)) or 0
    page = session.scalars(
        select(Search).order_by(Search.created_at.desc(), Search.id).limit(limit).offset(offset)
    ).all()
    return page, total


def list_trials(*, session: Session, search_id: str) -> Sequence[SearchTrial]:
    return session.scalars(
        select(SearchTrial).where(SearchTrial.search_id == search_id).order_by(SearchTrial.number)
    ).all()


def add_trial(
    *, session: Session, search: Search, number: int, trial_id: int, params: dict[str, Any]
) -> SearchTrial:
    trial = SearchTrial(search_id=search.id, number=number, trial_id=trial_id, params=params, state=ACTIVE)
    session.add(trial)
    search.trials_asked += 1
    return trial


def end_trial(*, session: Session, search_id: str, number: int, state: str, **fields: Any) -> bool:
    """Move a running trial to `state` (with its value, mean, std or error); False if it had ended."""
    result = session.execute(
        update(SearchTrial)
        .where(SearchTrial.search_id == search_id, SearchTrial.number == number, SearchTrial.state == ACTIVE)
        .values(state=state, **fields)
    )
    return bool(getattr(result, "rowcount", 0))


def search_of_run(*, session: Session, run_id: str) -> str | None:
    """The search whose trial trains this run, if any (one indexed lookup per run event)."""
    return session.scalar(
        select(SearchTrial.search_id)
        .join(Run, Run.experiment_id == SearchTrial.experiment_id)
        .where(Run.id == run_id)
    )


def reserved_runs(*, session: Session, owner: str | None) -> int:
    """Runs the owner's running searches have yet to create (trials not yet asked × seeds)."""
    total = 0
    for spec, asked in session.execute(
        select(Search.spec, Search.trials_asked).where(Search.owner == owner, Search.status == ACTIVE)
    ):
        total += max(0, int(spec["trials"]) - asked) * len(spec["seeds"])
    return total


# ------------------------------------------------------------------------- the advancing lease


def poke(*, session: Session, search_id: str) -> None:
    session.execute(update(Search).where(Search.id == search_id).values(pokes=Search.pokes + 1))


def acquire(*, session: Session, search_id: str, now: datetime, until: datetime) -> int | None:
    """Take the lease on advancing the search; returns the poke count it was taken at, or None
    when another process holds it (a lease past its time is taken over: its holder died)."""
    result = session.execute(
        update(Search)
        .where(Search.id == search_id, or_(Search.advancing_until.is_(None), Search.advancing_until < now))
        .values(advancing_until=until)
    )
    if not getattr(result, "rowcount", 0):
        return None
    return session.scalar(select(Search.pokes).where(Search.id == search_id))


def release(*, session: Session, search_id: str, pokes: int | None) -> bool:
    """Release the lease if nobody poked since `pokes` (None: release whatever happened)."""
    query = update(Search).where(Search.id == search_id)
    if pokes is not None:
        query = query.where(Search.pokes == pokes)
    result = session.execute(query.values(advancing_until=None))
    return bool(getattr(result, "rowcount", 0))


def finish_search(*, session: Session, search: Search, status: str) -> None:
    search.status = status
    search.finished_at = utcnow()
