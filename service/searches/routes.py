"""/api/v1/searches: Optuna searches over a base run spec, each trial trained over seeds.

Submitting validates the space against the base spec (each dimension's bounds and choices make a
valid run), the budget (trials × seeds against the key's cap on active runs), stores the search,
creates its Optuna study in bnlab's database and asks its first trials; the workers advance it as
its runs train (service.searches.service).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Path, Response, status
from pydantic import ValidationError

from service.api.deps import LimitQuery, OffsetQuery, SessionDep, SettingsDep, full_id, resolved_id
from service.api.errors import Message
from service.api.images import IMAGE_RESPONSES, PlotFormat
from service.api.security import PrincipalDep
from service.experiments.plots import CONTENT_TYPES
from service.runs.service import refuse_if_aliased
from service.searches import plots, presets
from service.searches import repository as search_repo
from service.searches import service as searches
from service.searches.schemas import (
    SearchCreate,
    SearchesPublic,
    SearchPresetCreate,
    SearchPresetPublic,
    SearchPresetsPublic,
    SearchPresetStarted,
    SearchPublic,
)

router = APIRouter(prefix="/api/v1/searches", tags=["searches"])
# Their own prefix: under /api/v1/searches, "presets" would also match /{search_id}'s routes.
preset_router = APIRouter(prefix="/api/v1/search-presets", tags=["searches"])

SearchIdPath = Annotated[
    str,
    Path(pattern=r"^[0-9a-f]{6,32}$", description="A search id (32 hex), or a unique prefix of 6 or more."),
]


def search_id_for(given: str) -> str:
    return full_id(
        "search", given, lambda s, p, n: search_repo.search_ids_with_prefix(session=s, prefix=p, limit=n)
    )


async def resolve_search_id(search_id: SearchIdPath) -> str:
    return await resolved_id(search_id, search_id_for)


SearchId = Annotated[str, Depends(resolve_search_id)]


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    summary="Start a search: Optuna proposes values for the space; each trial trains once per seed",
    responses={
        422: {
            "description": "Invalid spec, a value of the space that makes an invalid run, or "
            "trials × seeds over the key's cap"
        },
        429: {"model": Message},
        503: {"model": Message},
    },
)
def submit_search(
    spec: SearchCreate,
    session: SessionDep,
    settings: SettingsDep,
    principal: PrincipalDep,
    response: Response,
) -> SearchPublic:
    search = searches.create_search(session=session, settings=settings, owner=principal.name, spec=spec)
    response.headers["Location"] = f"/api/v1/searches/{search.id}"
    return searches.search_public(session=session, search=search)


@preset_router.get("", summary="Named searches: an article claim asked as searches")
def list_search_presets() -> SearchPresetsPublic:
    return SearchPresetsPublic(
        items=[
            SearchPresetPublic(name=p.name, claim=p.claim, searches=list(p.searches))
            for p in presets.SEARCH_PRESETS.values()
        ]
    )


@preset_router.post(
    "/{name}",
    status_code=status.HTTP_202_ACCEPTED,
    summary="Start a preset's searches, with optional trials, seeds, dataset, limit or epochs",
    responses={404: {"model": Message}, 422: {"model": Message}, 429: {"model": Message}},
)
def start_search_preset(
    name: Annotated[str, Path(pattern=r"^[a-z0-9-]{1,64}$")],
    session: SessionDep,
    settings: SettingsDep,
    principal: PrincipalDep,
    overrides: SearchPresetCreate | None = None,
) -> SearchPresetStarted:
    preset = presets.SEARCH_PRESETS.get(name)
    if preset is None:
        known = ", ".join(presets.SEARCH_PRESETS)
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"no search preset {name!r}; known: {known}")
    try:
        specs = presets.preset_searches(preset, overrides or SearchPresetCreate())
    except ValidationError as exc:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT, detail=f"the overrides make an invalid search: {exc}"
        ) from exc
    started = []
    for spec in specs:  # each validated, budgeted and committed as POST /api/v1/searches does
        search = searches.create_search(session=session, settings=settings, owner=principal.name, spec=spec)
        started.append(searches.search_public(session=session, search=search))
    return SearchPresetStarted(preset=name, searches=started)


@router.get("", summary="List searches, newest first")
def list_searches(session: SessionDep, limit: LimitQuery = 20, offset: OffsetQuery = 0) -> SearchesPublic:
    page, total = search_repo.list_searches(session=session, limit=limit, offset=offset)
    return SearchesPublic(
        items=[searches.search_public(session=session, search=s) for s in page],
        total=total,
        limit=limit,
        offset=offset,
    )


@router.get(
    "/{search_id}",
    summary="One search: its status, every trial's mean ± std over seeds, the best trial and the "
    "parameter importances (fANOVA, with ≥ 2 complete trials)",
)
def get_search(search_id: SearchId, session: SessionDep) -> SearchPublic:
    search = searches.search_or_404(session, search_id)
    return searches.search_public(session=session, search=search, importances=True)


@router.post("/{search_id}/cancel", summary="Stop the search: no new trials, its unfinished runs cancelled")
def cancel_search(search_id: SearchId, session: SessionDep) -> SearchPublic:
    search = searches.search_or_404(session, search_id)
    searches.cancel_search(session=session, search=search)
    session.refresh(search)
    return searches.search_public(session=session, search=search)


@router.delete(
    "/{search_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Cancel and delete a search with its trials' experiments, their runs, and its Optuna study",
    responses={409: {"model": Message, "description": "An alias serves one of its runs"}},
)
def delete_search(search_id: SearchId, session: SessionDep) -> None:
    search = searches.search_or_404(session, search_id)
    for trial in search_repo.list_trials(session=session, search_id=search.id):
        if trial.experiment_id:
            refuse_if_aliased(session, f"search {search.id}", [], trial.experiment_id)
    searches.delete_search(session=session, search=search)


@router.get(
    "/{search_id}/plots/{kind}.{fmt}",
    summary="Optuna's plots of the search: history (the objective per trial and the best so far), "
    "parallel (parallel coordinates) or slice (the objective against each parameter)",
    response_class=Response,
    responses=IMAGE_RESPONSES,
)
def get_plot(search_id: SearchId, kind: plots.PlotKind, fmt: PlotFormat, session: SessionDep) -> Response:
    search = searches.search_or_404(session, search_id)
    complete = [
        t for t in search_repo.list_trials(session=session, search_id=search.id) if t.state == "complete"
    ]
    if not complete:
        raise HTTPException(
            status.HTTP_409_CONFLICT, detail=f"search {search.id} has no complete trial to plot yet"
        )
    session.commit()  # ends the read: Optuna reads through its own connections
    image = plots.search_plot(searches.load_study(search), kind, fmt)
    return Response(image, media_type=CONTENT_TYPES[fmt])
