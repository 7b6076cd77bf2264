"""The report over an experiment's results.

It works on plain rows (`RunResult`), so its arithmetic is tested on hand-made numbers: statistics
are over the *succeeded* runs of a configuration, one value per seed; the standard deviation is the
sample one (ddof=1) and is null with a single seed (no spread is known).

Claims (for presets) are linear contrasts of configuration means, judged by `VERDICT_RULE`.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from service.experiments.grid import METRICS, config_label, grid_points
from service.experiments.schemas import (
    ExperimentCreate,
    ExperimentReportClaim,
    ExperimentReportConfig,
    ExperimentReportEpochs,
    ExperimentReportPublic,
    ExperimentReportStat,
    ExperimentReportWinner,
)
from service.ml.finite import finite_or_none


@dataclass(frozen=True)
class EpochRow:
    """One epoch's metrics; NaN where the stored value is null (not finite: the run diverged)."""

    epoch: int
    val_accuracy: float
    val_loss: float
    train_accuracy: float
    train_loss: float

    @classmethod
    def stored(
        cls,
        epoch: int,
        val_accuracy: float | None,
        val_loss: float | None,
        train_accuracy: float | None,
        train_loss: float | None,
    ) -> EpochRow:
        """The row from the database's columns, where a diverged epoch's values are null."""
        values = (val_accuracy, val_loss, train_accuracy, train_loss)
        return cls(epoch, *(math.nan if v is None else v for v in values))

    @property
    def diverged(self) -> bool:
        return not (math.isfinite(self.train_loss) and math.isfinite(self.val_loss))


@dataclass(frozen=True)
class RunResult:
    """One run as the report sees it: its grid point, seed, state and per-epoch metrics."""

    point: dict[str, Any]
    seed: int
    status: str
    epochs: list[EpochRow] = field(default_factory=list)


def diverged(run: RunResult) -> bool:
    """A run whose loss became NaN or infinite: the worker stopped it there and it ended failed."""
    return any(e.diverged for e in run.epochs)


def stat(values: Sequence[float]) -> ExperimentReportStat:
    """Mean and sample std (ddof=1); null std below 2 values, null mean if any value is not finite
    (a diverged seed has no meaningful average with the others)."""
    clean = [finite_or_none(v) for v in values]
    if not values or any(v is None for v in clean):
        return ExperimentReportStat(mean=None, std=None, n=len(values), values=clean)
    std = statistics.stdev(values) if len(values) > 1 else None
    return ExperimentReportStat(mean=statistics.fmean(values), std=std, n=len(values), values=clean)


def higher_is_better(metric: str) -> bool:
    return metric.endswith("accuracy")


def best_of(epochs: Sequence[EpochRow], metric: str) -> float:
    values: list[float] = [getattr(e, metric) for e in epochs]
    finite = [v for v in values if math.isfinite(v)] or values
    return max(finite) if higher_is_better(metric) else min(finite)


def _final(run: RunResult, metric: str) -> float:
    return math.nan if diverged(run) else float(getattr(run.epochs[-1], metric))


def _best(run: RunResult, metric: str) -> float:
    # A diverged seed's best value before it diverged would flatter its configuration.
    return math.nan if diverged(run) else best_of(run.epochs, metric)


def epochs_to_target(epochs: Sequence[EpochRow], target: float) -> int | None:
    """The first epoch whose validation accuracy reaches the target, or None."""
    return next((e.epoch for e in epochs if e.val_accuracy >= target), None)


def _config_report(point: dict[str, Any], runs: list[RunResult], target: float) -> ExperimentReportConfig:
    done = sorted((r for r in runs if r.status == "succeeded" and r.epochs), key=lambda r: r.seed)
    # A diverged seed is a result, not an accident: it enters the statistics as a non-finite value,
    # which makes the configuration's mean null (dropping it would average only the seeds that
    # survived). It still counts as failed: no model was stored.
    counted = sorted(
        (r for r in runs if (r.status == "succeeded" and r.epochs) or diverged(r)), key=lambda r: r.seed
    )
    reached = {str(r.seed): epochs_to_target(r.epochs, target) for r in done}
    hits = [e for e in reached.values() if e is not None]
    return ExperimentReportConfig(
        config=config_label(point),
        grid_point=point,
        runs=len(runs),
        succeeded=len(done),
        unfinished=sum(r.status in ("queued", "running") for r in runs),
        failed=sum(r.status in ("failed", "cancelled") for r in runs),
        diverged=sum(diverged(r) for r in runs),
        final={m: stat([_final(r, m) for r in counted]) for m in METRICS},
        best={m: stat([_best(r, m) for r in counted]) for m in METRICS},
        epochs_to_target=ExperimentReportEpochs(
            target=target,
            per_seed=reached,
            reached=len(hits),
            mean=statistics.fmean(hits) if hits else None,
        ),
    )


def group_by_config(points: Sequence[dict[str, Any]], results: Sequence[RunResult]) -> list[list[RunResult]]:
    return [[r for r in results if r.point == point] for point in points]


def _winner(configs: Sequence[ExperimentReportConfig], metric: str) -> ExperimentReportWinner | None:
    higher = metric != "epochs_to_target" and higher_is_better(metric)

    def mean_of(c: ExperimentReportConfig) -> float | None:
        if metric == "epochs_to_target":
            # Only configurations where every finished seed reached the target compete on speed.
            ett = c.epochs_to_target
            return ett.mean if ett.reached == c.succeeded else None
        section, name = metric.split(".")
        return (c.final if section == "final" else c.best)[name].mean

    ranked = sorted(
        ((m, c.config) for c in configs if (m := mean_of(c)) is not None), key=lambda t: t[0], reverse=higher
    )
    if not ranked:
        return None
    runner = ranked[1] if len(ranked) > 1 else (None, None)
    return ExperimentReportWinner(
        metric=metric,
        better="higher" if higher else "lower",
        config=ranked[0][1],
        mean=ranked[0][0],
        runner_up=runner[1],
        runner_up_mean=runner[0],
    )


WINNER_METRICS = (
    *(f"final.{m}" for m in METRICS),
    "best.val_accuracy",
    "best.val_loss",
    "epochs_to_target",
)


def report(
    *,
    experiment_id: str,
    spec: ExperimentCreate,
    preset: str | None,
    results: Sequence[RunResult],
    target: float,
    claims: Sequence[Claim] = (),
) -> ExperimentReportPublic:
    points = grid_points(spec.grid)
    configs = [
        _config_report(p, runs, target)
        for p, runs in zip(points, group_by_config(points, results), strict=True)
    ]
    winners = [w for m in WINNER_METRICS if (w := _winner(configs, m)) is not None]
    return ExperimentReportPublic(
        experiment_id=experiment_id,
        name=spec.name,
        preset=preset,
        target=target,
        finished=all(r.status not in ("queued", "running") for r in results),
        configurations=configs,
        winners=winners,
        claims=[judge(claim, configs) for claim in claims],
        verdict_rule=VERDICT_RULE,
    )


# ---------------------------------------------------------------------------------------- claims

VERDICT_RULE = (
    "A claim is a contrast Σ cᵢ·meanᵢ of configuration means of one metric, oriented so that a positive "
    "value is the claim's direction; its noise band is 2·sqrt(Σ cᵢ²·stdᵢ²/nᵢ) (two standard errors, "
    "from the spread over seeds). inconclusive: a configuration has unfinished runs, fewer than 2 "
    "succeeded seeds, or a non-finite mean, or |contrast| ≤ noise band; supported: contrast > noise "
    "band; not supported: contrast < −noise band (the data point the other way). With 3 seeds this is "
    "a rough screen, not a significance test."
)


@dataclass(frozen=True)
class Term:
    """One configuration in a contrast: the grid values that pick it out, and its coefficient."""

    match: dict[str, Any]
    coefficient: float


@dataclass(frozen=True)
class Claim:
    sentence: str
    metric: str  # "final.val_accuracy", "best.val_loss", ...
    terms: tuple[Term, ...]
    # Describes the contrast in words for the evidence sentence, e.g. "none − batch".
    contrast: str


def _matching(configs: Sequence[ExperimentReportConfig], match: Mapping[str, Any]) -> ExperimentReportConfig:
    found = [c for c in configs if all(c.grid_point.get(k) == v for k, v in match.items())]
    if len(found) != 1:
        raise ValueError(f"claim term {match} matches {len(found)} configurations, not one")
    return found[0]


def _stat(config: ExperimentReportConfig, metric: str) -> ExperimentReportStat:
    section, name = metric.split(".")
    return (config.final if section == "final" else config.best)[name]


def _fmt(s: ExperimentReportStat) -> str:
    if s.mean is None:
        return "not finite" if s.n else "no data"
    spread = f" ± {s.std:.4f}" if s.std is not None else ""
    return f"{s.mean:.4f}{spread} (n={s.n})"


def judge(claim: Claim, configs: Sequence[ExperimentReportConfig]) -> ExperimentReportClaim:
    """Apply VERDICT_RULE to one claim."""
    picked = [(_matching(configs, t.match), t.coefficient) for t in claim.terms]
    numbers = "; ".join(f"{c.config}: {_fmt(_stat(c, claim.metric))}" for c, _ in picked)
    problem = None
    if any(c.unfinished for c, _ in picked):
        problem = "runs are unfinished"
    elif any(_stat(c, claim.metric).n < 2 for c, _ in picked):
        problem = "a configuration has fewer than 2 succeeded seeds"
    elif any(_stat(c, claim.metric).mean is None for c, _ in picked):
        problem = "a configuration has a non-finite value (diverged)"
    if problem:
        return ExperimentReportClaim(
            claim=claim.sentence,
            verdict="inconclusive",
            evidence=f"{claim.metric}: {numbers}. Inconclusive: {problem}.",
            difference=None,
            noise=None,
        )
    stats = [(_stat(c, claim.metric), k) for c, k in picked]
    difference = sum(k * (s.mean or 0.0) for s, k in stats)
    noise = 2 * math.sqrt(sum(k * k * (s.std or 0.0) ** 2 / s.n for s, k in stats))
    verdict: Literal["supported", "not supported", "inconclusive"] = "inconclusive"
    if difference > noise:
        verdict = "supported"
    elif difference < -noise:
        verdict = "not supported"
    return ExperimentReportClaim(
        claim=claim.sentence,
        verdict=verdict,
        evidence=f"{claim.metric}: {numbers}. {claim.contrast} = {difference:+.4f}, noise band ±{noise:.4f}"
        f" → {verdict}.",
        difference=difference,
        noise=noise,
    )
