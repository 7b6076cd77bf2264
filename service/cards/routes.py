"""/api/v1/cards: replication cards (a paper's claim, bnlab's experiment of it, pre-declared contrasts),
their runs' reports and figures; /api/v1/replications: every card with its latest verdicts."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, HTTPException, Path, Response, status

from service.api.deps import SessionDep, SettingsDep
from service.api.errors import Message
from service.api.images import IMAGE_RESPONSES, PlotFormat
from service.api.security import PrincipalDep
from service.cards import figures
from service.cards import service as cards
from service.cards.catalogue import CARDS
from service.cards.schemas import (
    CardCreate,
    CardPublic,
    CardReportPublic,
    CardsPublic,
    ReplicationPublic,
    ReplicationsPublic,
)
from service.experiments.plots import CONTENT_TYPES

router = APIRouter(prefix="/api/v1/cards", tags=["cards"])
replications_router = APIRouter(prefix="/api/v1/replications", tags=["cards"])

CardPath = Annotated[str, Path(pattern=r"^[a-z][a-z0-9-]{0,63}$", description="A card's name.")]
CardRunPath = Annotated[
    str, Path(pattern=r"^[0-9a-f]{32}$", description="A card run's id (its first experiment's).")
]


@router.get("", summary="Every replication card: claim, paper figures, setup, contrasts, estimates")
def list_cards(session: SessionDep, settings: SettingsDep) -> CardsPublic:
    items = []
    for card in CARDS.values():
        last = cards.last_run(session, card)
        items.append(cards.card_public(card, settings, cards.run_summary(session, last) if last else None))
    return CardsPublic(items=items)


@router.get("/{name}", summary="One card, whether this build can run it, and its latest run")
def get_card(name: CardPath, session: SessionDep, settings: SettingsDep) -> CardPublic:
    card = cards.card_or_404(name)
    last = cards.last_run(session, card)
    return cards.card_public(card, settings, cards.run_summary(session, last) if last else None)


@router.post(
    "/{name}",
    status_code=status.HTTP_202_ACCEPTED,
    summary="Run a card (optionally at another scale, with other seeds or dataset); answers its report",
    responses={
        409: {"model": Message, "description": "The card needs a feature this build lacks"},
        422: {"model": Message},
        429: {"model": Message},
        503: {"model": Message},
    },
)
def start_card(
    name: CardPath,
    session: SessionDep,
    settings: SettingsDep,
    principal: PrincipalDep,
    response: Response,
    overrides: Annotated[CardCreate | None, Body()] = None,
) -> CardReportPublic:
    return cards.start_card(
        session=session,
        settings=settings,
        owner=principal.name,
        card=cards.card_or_404(name),
        overrides=overrides or CardCreate(),
        response=response,
    )


@router.get(
    "/{name}/runs/{run_id}", summary="A card run's report: intervals, Holm-adjusted p-values, verdicts"
)
def get_card_report(
    name: CardPath, run_id: CardRunPath, session: SessionDep, settings: SettingsDep
) -> CardReportPublic:
    loaded = cards.load_card_run(session, cards.card_or_404(name), run_id)
    session.commit()  # a read: end it before the statistics, so SQLite's lock is not held for them
    return cards.card_report(loaded, settings)


@router.get("/{name}/report", summary="The report of the card's latest run")
def get_latest_report(name: CardPath, session: SessionDep, settings: SettingsDep) -> CardReportPublic:
    card = cards.card_or_404(name)
    last = cards.last_run(session, card)
    if last is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"card {name} has not run yet")
    loaded = cards.load_card_run(session, card, last.id)
    session.commit()
    return cards.card_report(loaded, settings)


@router.get(
    "/{name}/runs/{run_id}/figure.{fmt}",
    summary="The paper's figure redrawn from the card run, beside each claim's interval and verdict",
    response_class=Response,
    responses=IMAGE_RESPONSES,
)
def get_card_figure(name: CardPath, run_id: CardRunPath, fmt: PlotFormat, session: SessionDep) -> Response:
    card = cards.card_or_404(name)
    loaded = cards.load_card_run(session, card, run_id)
    session.commit()  # a read: end it before drawing
    if not any(r.epochs for r in loaded.rows):
        raise HTTPException(status.HTTP_409_CONFLICT, detail=f"card run {run_id} has no finished epoch yet")
    image = figures.card_figure(card, loaded.rows, cards.judge(loaded), fmt)
    return Response(image, media_type=CONTENT_TYPES[fmt])


@replications_router.get("", summary="Every card, its latest verdicts, when it ran and how long it took")
def list_replications(session: SessionDep, settings: SettingsDep) -> ReplicationsPublic:
    loaded = {}
    for card in CARDS.values():
        last = cards.last_run(session, card)
        loaded[card.name] = cards.load_card_run(session, card, last.id) if last else None
    session.commit()  # a read: end it before the statistics
    items = []
    for card in CARDS.values():
        public = cards.card_public(card, settings)
        run = loaded[card.name]
        report = cards.card_report(run, settings) if run else None
        items.append(
            ReplicationPublic(
                card=card.name,
                title=card.title,
                available=public.available,
                unavailable_reason=public.unavailable_reason,
                estimated_seconds=public.estimated_seconds.get("quick", 0),
                last_run=report.run_id if report else None,
                scale=report.scale if report else None,
                ran_at=report.created_at if report else None,
                measured_seconds=report.measured_seconds if report else None,
                finished=report.finished if report else None,
                verdicts={
                    c.name: (c.verdict or "pending") + (f" ({c.reason})" if c.reason else "")
                    for c in (report.claims if report else [])
                },
                summary=report.summary if report else None,
            )
        )
    return ReplicationsPublic(items=items)
