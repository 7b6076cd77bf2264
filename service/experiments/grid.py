"""Experiments: a grid of run specs, and the report over their results.

Grid expansion applies each grid point (dotted spec path -> value) to the base spec and validates the
result as a `RunCreate`, so a point that makes no valid run is refused before anything is stored.

The report works on plain rows (`RunResult`), so its arithmetic is tested on hand-made numbers:
statistics are over the *succeeded* runs of a configuration, one value per seed; the standard
deviation is the sample one (ddof=1) and is null with a single seed (no spread is known).

Claims (for presets) are linear contrasts of configuration means, judged by `VERDICT_RULE`.
"""

from __future__ import annotations

import itertools
import math
import re
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import ValidationError

from service.runs.schemas import (
    MAX_EXPERIMENT_RUNS,
    ExperimentCreate,
    ExperimentReportClaim,
    ExperimentReportConfig,
    ExperimentReportEpochs,
    ExperimentReportPublic,
    ExperimentReportStat,
    ExperimentReportWinner,
    RunCreate,
)

METRICS = ("val_accuracy", "val_loss", "train_accuracy", "train_loss")
RUN_NAME_CHARS = re.compile(r"[^\w .,:;()+=@#%&!?'-]")


class GridError(ValueError):
    """The experiment cannot be expanded into valid runs; the message names the point and field."""


@dataclass(frozen=True)
class PlannedRun:
    point: dict[str, Any]
    seed: int
    spec: RunCreate


# ---------------------------------------------------------------------------------------- grid


def grid_points(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Every combination of the grid's values, in the order given (the first key varies slowest)."""
    keys = list(grid)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*grid.values())]


def set_path(spec: dict[str, Any], path: str, value: Any) -> None:
    """Set a dotted path in a nested spec dict, creating missing objects along the way."""
    *parents, leaf = path.split(".")
    node = spec
    for i, key in enumerate(parents):
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise GridError(f"grid key {path}: {'.'.join(parents[: i + 1])} is not an object")
        node = child
    node[leaf] = value


def _short_key(path: str, all_paths: Sequence[str]) -> str:
    """`model.norm.kind` -> `norm`, `train.lr` -> `lr`; the full path when two keys would collide."""
    parts = path.split(".")
    short = parts[-2] if parts[-1] == "kind" and len(parts) > 1 else parts[-1]
    others = [p for p in all_paths if p != path]
    return path if short in {_short_key(p, [p]) for p in others} else short


def _format_value(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value).lower() if value is not None else "null"
    if isinstance(value, float):
        return format(value, "g")
    if isinstance(value, list):
        return "x".join(_format_value(v) for v in value)
    return str(value)


def config_label(point: Mapping[str, Any]) -> str:
    """A configuration's readable name: `norm=batch lr=0.01` (`base` for an empty grid)."""
    if not point:
        return "base"
    paths = list(point)
    return " ".join(f"{_short_key(p, paths)}={_format_value(v)}" for p, v in point.items())


def run_name(experiment: str, point: Mapping[str, Any], seed: int) -> str:
    # A run name may carry no slash or other path characters: strip what a value could bring in.
    name = RUN_NAME_CHARS.sub("", f"{experiment}: {config_label(point)} seed={seed}")
    return name[:200]


def _point_error(point: Mapping[str, Any], seed: int, exc: ValidationError) -> GridError:
    first = exc.errors(include_url=False)[0]
    where = ".".join(str(part) for part in first["loc"]) or "spec"
    return GridError(
        f"grid point {config_label(point)} (seed {seed}) makes an invalid run: {where}: {first['msg']}"
        f" ({exc.error_count()} error(s))"
    )


def expand(experiment: ExperimentCreate) -> list[PlannedRun]:
    """The experiment's runs, by configuration then seed; raises GridError naming a bad point."""
    points = grid_points(experiment.grid)
    count = len(points) * len(experiment.seeds)
    if count > MAX_EXPERIMENT_RUNS:
        raise GridError(
            f"the experiment would create {count} runs ({len(points)} grid points × "
            f"{len(experiment.seeds)} seeds); the limit is {MAX_EXPERIMENT_RUNS}"
        )
    planned = []
    for point in points:
        for seed in experiment.seeds:
            raw = experiment.submitted_base()
            for path, value in point.items():
                set_path(raw, path, value)
            set_path(raw, "train.seed", seed)
            raw["name"] = run_name(experiment.name, point, seed)
            try:
                spec = RunCreate.model_validate(raw)
            except ValidationError as exc:
                raise _point_error(point, seed, exc) from exc
            planned.append(PlannedRun(point=point, seed=seed, spec=spec))
    return planned


# ---------------------------------------------------------------------------------------- report


@dataclass(frozen=True)
class EpochRow:
    epoch: int
    val_accuracy: float
    val_loss: float
    train_accuracy: float
    train_loss: float


@dataclass(frozen=True)
class RunResult:
    """One run as the report sees it: its grid point, seed, state and per-epoch metrics."""

    point: dict[str, Any]
    seed: int
    status: str
    epochs: list[EpochRow] = field(default_factory=list)


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def stat(values: Sequence[float]) -> ExperimentReportStat:
    """Mean and sample std (ddof=1); null std below 2 values, null mean if any value is not finite
    (a diverged seed has no meaningful average with the others)."""
    clean = [_finite(v) for v in values]
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


def epochs_to_target(epochs: Sequence[EpochRow], target: float) -> int | None:
    """The first epoch whose validation accuracy reaches the target, or None."""
    return next((e.epoch for e in epochs if e.val_accuracy >= target), None)


def _config_report(point: dict[str, Any], runs: list[RunResult], target: float) -> ExperimentReportConfig:
    done = sorted((r for r in runs if r.status == "succeeded" and r.epochs), key=lambda r: r.seed)
    reached = {str(r.seed): epochs_to_target(r.epochs, target) for r in done}
    hits = [e for e in reached.values() if e is not None]
    return ExperimentReportConfig(
        config=config_label(point),
        grid_point=point,
        runs=len(runs),
        succeeded=len(done),
        unfinished=sum(r.status in ("queued", "running") for r in runs),
        failed=sum(r.status in ("failed", "cancelled") for r in runs),
        final={m: stat([getattr(r.epochs[-1], m) for r in done]) for m in METRICS},
        best={m: stat([best_of(r.epochs, m) for r in done]) for m in METRICS},
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
