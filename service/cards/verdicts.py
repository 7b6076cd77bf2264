"""A card's claims judged from its runs: each pre-declared contrast evaluated per seed (seeds pair the
runs: same initialisation seed and data order in every configuration), tested against 0 with the
paired t-test of `service.experiments.statistics`, Holm-adjusted across the card's claims, and judged by
that module's fixed rule. Seeds whose runs failed (or gave a non-finite value) are dropped from the
claim; fewer than two left is `statistics.failed()`.

Pure functions over plain rows, so the arithmetic is tested on hand-made numbers.
"""

from __future__ import annotations

import math
import statistics as pystats
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from service.cards.model import Card, Contrast
from service.experiments import statistics
from service.experiments.report import EpochRow, Term

ORDER_OF_MAGNITUDE = 10.0  # effects within a factor of 10 of the paper's are "the same order of magnitude"


@dataclass(frozen=True)
class SlotStat:
    epoch: int
    layer: str
    input_mean: float
    input_std: float

    @classmethod
    def stored(cls, epoch: int, layer: str, input_mean: float | None, input_std: float | None) -> SlotStat:
        """The row from the database, where a value that was not finite is null (NaN here)."""
        return cls(
            epoch,
            layer,
            math.nan if input_mean is None else input_mean,
            math.nan if input_std is None else input_std,
        )


@dataclass(frozen=True)
class ProbeRow:
    """One value of an epoch-end probe: family (gradients, smoothness, percentiles, gamma,
    statistics_gap), epoch (0: at initialisation), layer (a module, or "model"), name, value."""

    probe: str
    epoch: int
    layer: str
    name: str
    value: float | None


@dataclass(frozen=True)
class CardRun:
    """One run of a card as the verdicts see it."""

    point: dict[str, Any]
    seed: int
    status: str
    epochs: list[EpochRow] = field(default_factory=list)
    slots: list[SlotStat] = field(default_factory=list)
    probes: list[ProbeRow] = field(default_factory=list)


@dataclass(frozen=True)
class ClaimResult:
    contrast: Contrast
    per_seed: dict[int, float]  # the contrast's value at each seed that counted
    dropped: list[int]  # seeds left out: a run failed, is missing or gave a non-finite value
    comparison: statistics.Comparison | None
    judgement: statistics.Judgement | None  # None while runs are unfinished
    paper: str  # one sentence: how the effect compares with the paper's figure


# ----------------------------------------------------------------------------------- metrics


def _slot_shift(run: CardRun) -> float:
    """How far each norm slot's input moved over training, averaged over slots: |Δmean| / std₀ +
    |ln(std / std₀)| between epoch 0 (initialisation) and the last probed epoch."""
    by_layer: dict[str, list[SlotStat]] = {}
    for s in run.slots:
        by_layer.setdefault(s.layer, []).append(s)
    shifts = []
    for stats in by_layer.values():
        stats.sort(key=lambda s: s.epoch)
        first, last = stats[0], stats[-1]
        if first.epoch == last.epoch or first.input_std <= 0 or last.input_std <= 0:
            continue
        shifts.append(
            abs(last.input_mean - first.input_mean) / first.input_std
            + abs(math.log(last.input_std / first.input_std))
        )
    return pystats.fmean(shifts) if shifts else math.nan


def _probe(run: CardRun, probe: str, name: str, layer: str | None = "model") -> dict[int, list[float]]:
    """A probe's finite values by epoch (of one layer, or of every layer when `layer` is None)."""
    found: dict[int, list[float]] = {}
    for p in run.probes:
        wanted = p.probe == probe and p.name == name and (layer is None or p.layer == layer)
        if wanted and p.value is not None and math.isfinite(p.value):
            found.setdefault(p.epoch, []).append(p.value)
    return found


def _percentile_drift(run: CardRun) -> float:
    """How far the last norm slot's input distribution moved over training (the BN paper's Fig. 1
    plots the last hidden layer's): the mean |Δ| of its 15th, 50th and 85th percentiles from
    initialisation to the last epoch, in units of its initial 15–85 spread."""
    rows = [p for p in run.probes if p.probe == "percentiles" and p.value is not None]
    if not rows:
        return math.nan
    last_slot = max({p.layer for p in rows})
    values = {(p.epoch, p.name): float(p.value) for p in rows if p.layer == last_slot and p.value is not None}
    epochs = sorted({e for e, _ in values})
    first, last = epochs[0], epochs[-1]
    try:
        spread = values[(first, "p85")] - values[(first, "p15")]
        moved = [abs(values[(last, q)] - values[(first, q)]) for q in ("p15", "p50", "p85")]
    except KeyError:
        return math.nan
    return pystats.fmean(moved) / spread if spread > 0 and first != last else math.nan


def _after_init_mean(values: dict[int, list[float]]) -> float:
    trained = [v for e, vs in values.items() if e > 0 for v in vs]
    return pystats.fmean(trained) if trained else math.nan


def _at_init(values: dict[int, list[float]]) -> float:
    return values[0][0] if values.get(0) else math.nan


def _last_epoch_mean(values: dict[int, list[float]]) -> float:
    return pystats.fmean(values[max(values)]) if values else math.nan


# Metrics from the epoch-end probes (the probe_values rows: probe, epoch, layer, name, value). A card
# naming one is unavailable while this build records no probes (`probes_recorded`).
PROBE_METRICS: dict[str, Callable[[CardRun], float]] = {
    "probe.sigmoid_input_drift": _percentile_drift,
    # The largest gradient change along −∇L (Santurkar et al. §3.2), averaged over the trained epochs.
    "probe.gradient_predictiveness": lambda r: _after_init_mean(_probe(r, "smoothness", "grad_change_max")),
    # The slope of log‖∂L/∂W_l‖ against the layer l (1 = input) at initialisation: negative when the
    # gradients grow towards the input (Yang et al. 2019).
    "probe.gradient_log_slope": lambda r: _at_init(_probe(r, "gradients", "log_slope")),
    # The EMA running mean's error against the exact population mean, in units of the input's std,
    # averaged over the norm layers after the last epoch (Wu & Johnson 2021).
    "probe.ema_gap": lambda r: _last_epoch_mean(_probe(r, "statistics_gap", "mean_gap", layer=None)),
}
DERIVED_METRICS: dict[str, Callable[[CardRun], float]] = {"shift.slot_inputs": _slot_shift}


def metric_available(name: str, *, probes_recorded: bool) -> bool:
    section = name.split(".")[0]
    if name in PROBE_METRICS:
        return probes_recorded
    return section in ("final", "best", "mean") or name in DERIVED_METRICS


def metric_value(run: CardRun, name: str) -> float:
    """One run's value of a card metric: final.X, best.X (max accuracy, min loss), mean.X over epochs,
    or a derived / probe metric. NaN when the run has no epoch."""
    if name in DERIVED_METRICS:
        return DERIVED_METRICS[name](run)
    if name in PROBE_METRICS:
        return PROBE_METRICS[name](run)
    section, column = name.split(".")
    values = [float(getattr(e, column)) for e in run.epochs]
    if not values:
        return math.nan
    if section == "final":
        return values[-1]
    if section == "mean":
        return pystats.fmean(values)
    finite = [v for v in values if math.isfinite(v)] or values
    return max(finite) if column.endswith("accuracy") else min(finite)


# ----------------------------------------------------------------------------------- contrasts


def matches(point: Mapping[str, Any], match: Mapping[str, Any]) -> bool:
    return all(point.get(k) == v for k, v in match.items())


def term_points(card: Card, term: Term) -> list[dict[str, Any]]:
    from service.experiments.grid import grid_points

    return [p for part in card.parts for p in grid_points(part) if matches(p, term.match)]


def check_contrasts(card: Card) -> None:
    """Each term of each contrast picks out exactly one configuration of the card's grids."""
    for contrast in card.contrasts:
        for term in contrast.terms:
            found = term_points(card, term)
            if len(found) != 1:
                raise ValueError(
                    f"card {card.name}, claim {contrast.name}: term {term.match} matches {len(found)} "
                    "configurations, not one"
                )


def per_seed_values(contrast: Contrast, runs: Sequence[CardRun]) -> tuple[dict[int, float], list[int]]:
    """The contrast at each seed where every term's run succeeded with a finite value; the rest."""
    seeds = sorted({r.seed for r in runs})
    values: dict[int, float] = {}
    dropped = []
    for seed in seeds:
        total = 0.0
        for term in contrast.terms:
            run = next(
                (
                    r
                    for r in runs
                    if r.seed == seed and r.status == "succeeded" and matches(r.point, term.match)
                ),
                None,
            )
            value = metric_value(run, contrast.metric) if run is not None else math.nan
            if not math.isfinite(value):
                total = math.nan
                break
            total += term.coefficient * value
        if math.isfinite(total):
            values[seed] = total
        else:
            dropped.append(seed)
    return values, dropped


def judge_card(card: Card, runs: Sequence[CardRun], *, finished: bool) -> list[ClaimResult]:
    """Every claim of the card: per-seed contrasts, paired tests, Holm across the tested claims, verdicts."""
    evaluated = [(c, *per_seed_values(c, runs)) for c in card.contrasts]
    comparisons: list[statistics.Comparison | None] = []
    for contrast, values, _ in evaluated:
        if len(values) < 2:
            comparisons.append(None)
            continue
        data = list(values.values())
        comparisons.append(
            statistics.compare(data, [0.0] * len(data), paired=True, smallest=contrast.smallest)
        )
    tested = [c.p_value for c in comparisons if c is not None]
    adjusted = iter(statistics.holm(tested))
    results = []
    for (contrast, values, dropped), comparison in zip(evaluated, comparisons, strict=True):
        judgement: statistics.Judgement | None
        if comparison is None:
            judgement = statistics.failed() if finished else None
        else:
            p = next(adjusted)
            judgement = (
                statistics.judge(
                    comparison, direction=contrast.direction, smallest=contrast.smallest, adjusted_p=p
                )
                if finished
                else None
            )
        results.append(
            ClaimResult(
                contrast, values, dropped, comparison, judgement, paper_comparison(contrast, comparison)
            )
        )
    return results


# ----------------------------------------------------------------------------------- sentences


def paper_comparison(contrast: Contrast, comparison: statistics.Comparison | None) -> str:
    """How bnlab's effect compares with the paper's: same direction, same order of magnitude, or not."""
    if comparison is None:
        return "No effect to compare with the paper's: too few runs succeeded."
    oriented = contrast.direction * comparison.effect
    way = (
        "the paper's direction"
        if oriented > 0
        else "against the paper's direction"
        if oriented < 0
        else "neither way"
    )
    if contrast.paper_effect is None:
        return f"The paper gives no verified number for this contrast; bnlab's effect points {way}."
    paper = contrast.paper_effect
    if oriented <= 0:
        return (
            f"bnlab's effect {comparison.effect:+.3g} points {way}; the paper's is {paper:+.3g} "
            f"({contrast.paper_effect_source})."
        )
    ratio = abs(comparison.effect) / abs(paper)
    size = (
        "the same order of magnitude"
        if 1 / ORDER_OF_MAGNITUDE <= ratio <= ORDER_OF_MAGNITUDE
        else ("over ten times smaller" if ratio < 1 else "over ten times larger")
    )
    return (
        f"Same direction as the paper and {size}: bnlab {comparison.effect:+.3g} against the paper's "
        f"{paper:+.3g} ({contrast.paper_effect_source})."
    )


def summary(card: Card, results: Sequence[ClaimResult], *, finished: bool) -> str:
    """What the data show, in one sentence, and how that compares with the paper."""
    if not finished:
        return f"{card.name}: runs are still training; the verdicts come when every run has ended."
    parts = []
    for verdict in ("supported", "contradicted", "inconclusive"):
        names = [
            r.contrast.name + (f" ({r.judgement.reason})" if r.judgement and r.judgement.reason else "")
            for r in results
            if r.judgement and r.judgement.verdict == verdict
        ]
        if names:
            parts.append(f"{verdict}: {', '.join(names)}")
    agree = sum(
        1 for r in results if r.comparison is not None and r.contrast.direction * r.comparison.effect > 0
    )
    with_paper = [r for r in results if r.contrast.paper_effect is not None and r.comparison is not None]
    paper = (
        f"; against the paper's verified figure: {with_paper[0].paper}"
        if with_paper
        else (
            f"; {agree} of {len(results)} effects point the paper's way (it gives directions, not "
            "verified numbers, for these contrasts)"
        )
    )
    return f"Of {len(results)} claims, " + "; ".join(parts) + paper
