"""The cards domain's logic: whether this build can run a card, the experiments a card run starts, its
time estimate, and its report (statistics and verdicts over every run of its experiments)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from typing import Any

from fastapi import HTTPException, Response, status
from pydantic import ValidationError
from sqlalchemy.orm import Session

from service.cards import repository as card_repo
from service.cards import verdicts
from service.cards.catalogue import CARDS
from service.cards.model import TEST_DATASET, Card, Scale, Sizes
from service.cards.schemas import (
    CardCreate,
    CardPublic,
    CardReportPublic,
    CardRunSummary,
    ClaimReport,
    ContrastPublic,
    PaperFigurePublic,
)
from service.config import Settings
from service.experiments import cost, grid, presets
from service.experiments import repository as experiment_repo
from service.experiments.report import EpochRow
from service.experiments.schemas import ExperimentCreate
from service.experiments.service import create_experiment, experiment_or_404
from service.ml import datasets
from service.ml.finite import finite_or_none
from service.models import Experiment, RunStatus
from service.runs.service import require_capacity

VERDICT_RULE = (
    "Each claim is a contrast Σ cᵢ·metric(configᵢ) evaluated per seed (seeds pair the runs: same init "
    "seed and data order), tested against 0 with a paired (one-sample) t-test; p-values are Holm–"
    "Bonferroni adjusted across the card's claims. supported: adjusted p < 0.05, the effect points the "
    "claimed way and reaches the smallest effect that counts; contradicted: adjusted p < 0.05 the other "
    "way; inconclusive otherwise, with the reason (runs failed: fewer than 2 seeds with every run "
    "succeeded; effect below the smallest that counts: significant but small, or an interval that stays "
    "under it; too few seeds: seeds_for_power says how many would do)."
)


# ----------------------------------------------------------------------------------- specs


def installed(settings: Settings) -> presets.DatasetCheck:
    search_dirs = [settings.data_dir, datasets.SYSTEM_DATASET_DIR]

    def available(name: str) -> bool:
        return name not in datasets.FILE_DATASETS or datasets.find_dataset_dir(name, search_dirs) is not None

    return available


def card_or_404(name: str) -> Card:
    card = CARDS.get(name)
    if card is None:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND, detail=f"no card named {name}; the cards are {', '.join(CARDS)}"
        )
    return card


def dataset_for(
    card: Card, scale: Scale, available: presets.DatasetCheck, override: str | None = None
) -> str:
    if override:
        return override
    if scale == "test":
        return TEST_DATASET
    return next((d for d in card.datasets if available(d)), card.datasets[-1])


def experiment_specs(
    card: Card, scale: Scale, dataset: str, seeds: list[int] | None = None
) -> list[ExperimentCreate]:
    """One experiment per grid of the card, at this scale; raises ValidationError / GridError when this
    build cannot make the runs (a field or kind it lacks)."""
    sizes: Sizes = card.sizes[scale]
    specs = []
    for i, part in enumerate(card.parts):
        base: dict[str, Any] = copy.deepcopy(card.base)
        base.setdefault("train", {})["epochs"] = sizes.epochs
        base["dataset"] = {"name": dataset, **({"limit": sizes.limit} if sizes.limit else {})}
        label = f"card {card.name} ({scale})" + (
            f" part {i + 1} of {len(card.parts)}" if len(card.parts) > 1 else ""
        )
        spec = ExperimentCreate.model_validate(
            {
                "name": label,
                "base": base,
                "grid": part,
                "seeds": list(seeds or sizes.seeds),
                "target": card.target,
            }
        )
        grid.expand(spec)
        specs.append(spec)
    return specs


@cache
def unavailable_reason(name: str, dataset: str) -> str | None:
    """Why this build cannot run the card (a probe or spec field it lacks), or None."""
    card = CARDS[name]
    needs = f"needs {card.needs}; " if card.needs else ""
    recorded = card_repo.PROBE_MODEL is not None
    missing = [
        m for c in card.contrasts if not verdicts.metric_available(m := c.metric, probes_recorded=recorded)
    ]
    if missing:
        names = ", ".join(sorted(set(missing)))
        return f"{needs}the per-epoch probe metric(s) {names} are not on this build yet"
    try:
        experiment_specs(card, "quick", dataset)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"])
        return f"{needs}this build refuses its spec: {where}: {first['msg']}"
    except grid.GridError as exc:
        return f"{needs}this build refuses its spec: {exc}"
    return None


def estimate(specs: list[ExperimentCreate], processes: int) -> int:
    return sum(cost.estimated_seconds(s, processes) for s in specs)


@cache
def _size(name: str, scale: Scale, dataset: str, processes: int) -> tuple[int, int]:
    """(runs, estimated seconds) of a card at a scale: fixed for a build, so computed once."""
    specs = experiment_specs(CARDS[name], scale, dataset)
    return _run_count(specs), estimate(specs, processes)


def _run_count(specs: list[ExperimentCreate]) -> int:
    return sum(len(grid.grid_points(s.grid)) * len(s.seeds) for s in specs)


# ----------------------------------------------------------------------------------- public views


def card_public(card: Card, settings: Settings, last: CardRunSummary | None = None) -> CardPublic:
    available = installed(settings)
    dataset = dataset_for(card, "quick", available)
    reason = unavailable_reason(card.name, dataset)
    runs, seconds = {}, {}
    if reason is None:
        for scale in card.sizes:
            runs[scale], seconds[scale] = _size(
                card.name, scale, dataset_for(card, scale, available), settings.training_processes
            )
    return CardPublic(
        name=card.name,
        title=card.title,
        citation=card.citation,
        claim=card.claim,
        paper_setup=card.paper_setup,
        paper_figures=[PaperFigurePublic(text=f.text, verified=f.verified) for f in card.paper_figures],
        setup=card.setup,
        differences=card.differences,
        available=reason is None,
        unavailable_reason=reason,
        dataset=dataset,
        grids=[dict(p) for p in card.parts],
        base=card.base,
        sizes={
            s: {"epochs": z.epochs, "seeds": list(z.seeds), "limit": z.limit} for s, z in card.sizes.items()
        },
        runs=runs,
        estimated_seconds=seconds,
        claims=[
            ContrastPublic(
                name=c.name,
                sentence=c.sentence,
                metric=c.metric,
                terms=[{"match": t.match, "coefficient": t.coefficient} for t in c.terms],
                contrast=c.words,
                direction="positive" if c.direction > 0 else "negative",
                smallest=c.smallest,
                paper_effect=c.paper_effect,
            )
            for c in card.contrasts
        ],
        figure={k: v for k, v in vars(card.figure).items()},
        last_run=last,
    )


def run_summary(session: Session, first: Experiment) -> CardRunSummary:
    parsed = card_repo.parse_tag(first.preset)
    return CardRunSummary(
        id=first.id,
        scale=parsed[1] if parsed else "quick",
        experiments=[e.id for e in card_repo.card_experiments(session=session, first=first)],
        created_at=first.created_at,
    )


def last_run(session: Session, card: Card) -> Experiment | None:
    found = card_repo.latest_card_runs(session=session, card=card.name)
    return found[0] if found else None


# ----------------------------------------------------------------------------------- starting


def start_card(
    *, session: Session, settings: Settings, owner: str, card: Card, overrides: CardCreate, response: Response
) -> CardReportPublic:
    available = installed(settings)
    dataset = dataset_for(card, overrides.scale, available, overrides.dataset)
    reason = unavailable_reason(card.name, dataset_for(card, "quick", available))
    if reason is not None:
        raise HTTPException(status.HTTP_409_CONFLICT, detail=f"card {card.name} is unavailable: {reason}")
    try:
        specs = experiment_specs(card, overrides.scale, dataset, overrides.seeds)
    except (ValidationError, grid.GridError) as exc:
        message = exc.errors()[0]["msg"] if isinstance(exc, ValidationError) else str(exc)
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            detail=f"card {card.name} cannot run with these overrides: {message}",
        ) from exc
    require_capacity(
        session=session, owner=owner, limit=settings.max_active_runs_per_key, adding=_run_count(specs)
    )
    first_id: str | None = None
    for spec in specs:
        created = create_experiment(
            session=session,
            settings=settings,
            owner=owner,
            spec=spec,
            preset=card_repo.tag(card.name, overrides.scale, first_id),
            response=response,
        )
        first_id = first_id or created.id
    assert first_id is not None
    response.headers["Location"] = f"/api/v1/cards/{card.name}/runs/{first_id}"
    return card_report(load_card_run(session, card, first_id), settings)


# ----------------------------------------------------------------------------------- the report


def card_run_or_404(session: Session, card: Card, run_id: str) -> tuple[Experiment, list[Experiment]]:
    first = experiment_or_404(session, run_id)
    parsed = card_repo.parse_tag(first.preset)
    if parsed is None or parsed[0] != card.name or parsed[2] is not None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"{run_id} is not a run of card {card.name}")
    return first, card_repo.card_experiments(session=session, first=first)


@dataclass(frozen=True)
class LoadedRun:
    """Everything a card run's report and figure need, read in one go, so the caller can end the
    database transaction before the statistics and the drawing (SQLite holds its lock till then)."""

    card: Card
    first: Experiment
    experiments: list[Experiment]
    specs: list[ExperimentCreate]
    rows: list[verdicts.CardRun]
    counts: dict[str, int]
    finished: bool
    finished_at: datetime | None


def load_card_run(session: Session, card: Card, run_id: str) -> LoadedRun:
    first, experiments = card_run_or_404(session, card, run_id)
    rows: list[verdicts.CardRun] = []
    counts = {s.value: 0 for s in RunStatus}
    ends = []
    for experiment in experiments:
        metrics = experiment_repo.metrics_by_run(session=session, experiment_id=experiment.id)
        slots = card_repo.layer_stats_by_run(session=session, experiment_id=experiment.id)
        probes = card_repo.probe_rows_by_run(session=session, experiment_id=experiment.id)
        for run in experiment_repo.list_experiment_runs(session=session, experiment_id=experiment.id):
            counts[run.status] += 1
            if run.finished_at is not None:
                ends.append(run.finished_at)
            rows.append(
                verdicts.CardRun(
                    point=run.grid_point or {},
                    seed=int(run.spec["train"]["seed"]),
                    status=run.status,
                    epochs=[
                        EpochRow.stored(m.epoch, m.val_accuracy, m.val_loss, m.train_accuracy, m.train_loss)
                        for m in metrics.get(run.id, [])
                    ],
                    slots=[
                        verdicts.SlotStat.stored(s.epoch, s.layer, s.input_mean, s.input_std)
                        for s in slots.get(run.id, [])
                    ],
                    probes=[
                        verdicts.ProbeRow(p.probe, p.epoch, p.layer, p.name, p.value)
                        for p in probes.get(run.id, [])
                    ],
                )
            )
    finished = all(RunStatus(r.status).is_finished for r in rows)
    return LoadedRun(
        card=card,
        first=first,
        experiments=experiments,
        specs=[ExperimentCreate.model_validate(e.spec) for e in experiments],
        rows=rows,
        counts=counts,
        finished=finished,
        finished_at=max(ends) if finished and ends else None,
    )


def claim_report(result: verdicts.ClaimResult) -> ClaimReport:
    c, cmp, j = result.contrast, result.comparison, result.judgement
    return ClaimReport(
        name=c.name,
        sentence=c.sentence,
        metric=c.metric,
        contrast=c.words,
        direction="positive" if c.direction > 0 else "negative",
        smallest=c.smallest,
        per_seed={str(k): v for k, v in result.per_seed.items()},
        dropped_seeds=result.dropped,
        n=len(result.per_seed),
        effect=finite_or_none(cmp.effect) if cmp else None,
        ci_low=finite_or_none(cmp.ci_low) if cmp else None,
        ci_high=finite_or_none(cmp.ci_high) if cmp else None,
        bootstrap_low=finite_or_none(cmp.bootstrap_low) if cmp else None,
        bootstrap_high=finite_or_none(cmp.bootstrap_high) if cmp else None,
        p_value=finite_or_none(cmp.p_value) if cmp else None,
        adjusted_p=finite_or_none(j.adjusted_p) if j else None,
        hedges_g=finite_or_none(cmp.hedges_g) if cmp else None,
        seeds_for_power=cmp.seeds_for_power if cmp else None,
        verdict=j.verdict if j else None,
        reason=j.reason if j else None,
        paper_effect=c.paper_effect,
        paper_comparison=result.paper,
    )


def judge(loaded: LoadedRun) -> list[verdicts.ClaimResult]:
    return verdicts.judge_card(loaded.card, loaded.rows, finished=loaded.finished)


def _estimate_of(loaded: LoadedRun, scale: str, processes: int) -> int:
    """The cost model's estimate for this run, from the card's own grids (a stored spec is the normalised
    one: re-expanding it could clash with a grid axis such as model.depth, which the submitted base left
    to the grid)."""
    spec = loaded.specs[0]
    size: Scale = scale if scale in ("test", "quick", "full") else "quick"  # type: ignore[assignment]
    return estimate(experiment_specs(loaded.card, size, spec.base.dataset.name, list(spec.seeds)), processes)


def card_report(loaded: LoadedRun, settings: Settings) -> CardReportPublic:
    """The report of a loaded card run: per claim the statistics and verdict; the times."""
    card, first = loaded.card, loaded.first
    results = judge(loaded)
    scale = (card_repo.parse_tag(first.preset) or ("", "quick", None))[1]
    base = f"/api/v1/cards/{card.name}/runs/{first.id}"
    measured = (loaded.finished_at - first.created_at).total_seconds() if loaded.finished_at else None
    return CardReportPublic(
        card=card.name,
        run_id=first.id,
        scale=scale,
        dataset=loaded.specs[0].base.dataset.name,
        experiments=[e.id for e in loaded.experiments],
        finished=loaded.finished,
        runs=loaded.counts,
        created_at=first.created_at,
        finished_at=loaded.finished_at,
        measured_seconds=measured,
        estimated_seconds=_estimate_of(loaded, scale, settings.training_processes),
        claims=[claim_report(r) for r in results],
        summary=verdicts.summary(card, results, finished=loaded.finished),
        verdict_rule=VERDICT_RULE,
        figure_png=f"{base}/figure.png",
        figure_svg=f"{base}/figure.svg",
    )
