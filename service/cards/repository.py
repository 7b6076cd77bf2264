"""Data functions for card runs. A card run is one experiment per grid of the card, stored in the
experiments table: the first carries `preset` = '<card>@<scale>' and its id is the card run's id; the
others carry '<card>@<scale>+<first id>'. They use the caller's session and never commit."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from service import models
from service.models import Experiment, LayerStat, Run

# The epoch-end probes' table (probe_values), once this build records them.
PROBE_MODEL: Any = getattr(models, "ProbeRecord", None)


def tag(card: str, scale: str, first_id: str | None = None) -> str:
    return f"{card}@{scale}" + (f"+{first_id}" if first_id else "")


def parse_tag(preset: str | None) -> tuple[str, str, str | None] | None:
    """(card, scale, first id or None) from an experiment's preset column; None if not a card's."""
    if not preset or "@" not in preset:
        return None
    card, rest = preset.split("@", 1)
    scale, _, first = rest.partition("+")
    return card, scale, first or None


def card_experiments(*, session: Session, first: Experiment) -> list[Experiment]:
    """The experiments of the card run that `first` starts, in grid order."""
    parsed = parse_tag(first.preset)
    if parsed is None:
        return [first]
    card, scale, _ = parsed
    others = session.scalars(
        select(Experiment)
        .where(Experiment.preset == tag(card, scale, first.id))
        .order_by(Experiment.created_at, Experiment.id)
    ).all()
    return [first, *others]


def latest_card_runs(*, session: Session, card: str, limit: int = 1) -> Sequence[Experiment]:
    """The newest first experiments of a card's runs (any scale)."""
    rows = session.scalars(
        select(Experiment)
        .where(Experiment.preset.startswith(f"{card}@"), Experiment.preset.not_like("%+%"))
        .order_by(Experiment.created_at.desc(), Experiment.id)
        .limit(limit)
    ).all()
    return rows


def layer_stats_by_run(*, session: Session, experiment_id: str) -> dict[str, list[LayerStat]]:
    rows = session.scalars(
        select(LayerStat)
        .join(Run, Run.id == LayerStat.run_id)
        .where(Run.experiment_id == experiment_id)
        .order_by(LayerStat.run_id, LayerStat.epoch, LayerStat.layer)
    ).all()
    grouped: dict[str, list[LayerStat]] = defaultdict(list)
    for row in rows:
        grouped[row.run_id].append(row)
    return grouped


def probe_rows_by_run(*, session: Session, experiment_id: str) -> dict[str, list[Any]]:
    """Every probe value of the experiment's runs, by run; empty on a build that records none."""
    if PROBE_MODEL is None:
        return {}
    rows = session.scalars(
        select(PROBE_MODEL).join(Run, Run.id == PROBE_MODEL.run_id).where(Run.experiment_id == experiment_id)
    ).all()
    grouped: dict[str, list[Any]] = defaultdict(list)
    for row in rows:
        grouped[row.run_id].append(row)
    return grouped
