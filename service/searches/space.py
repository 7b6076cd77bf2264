"""A search's space in Optuna's terms, and the run specs a trial's values make.

Parameters are named by their dotted spec path (`train.lr`). Optuna's categorical values must be
scalars, so a list choice (`model.hidden`: [64, 64]) travels as its JSON text and is decoded back.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

import optuna

from service.experiments import grid
from service.experiments.schemas import ExperimentCreate
from service.searches.schemas import Choice, FloatRange, IntRange, Objective, SearchCreate


class SpaceError(ValueError):
    """The space or a point of it makes no valid run; the message names the path and value."""


def distributions(spec: SearchCreate) -> dict[str, optuna.distributions.BaseDistribution]:
    dists: dict[str, optuna.distributions.BaseDistribution] = {}
    for path, dim in spec.space.items():
        if isinstance(dim, FloatRange):
            dists[path] = optuna.distributions.FloatDistribution(dim.low, dim.high, log=dim.log)
        elif isinstance(dim, IntRange):
            dists[path] = optuna.distributions.IntDistribution(dim.low, dim.high, log=dim.log, step=dim.step)
        else:
            dists[path] = optuna.distributions.CategoricalDistribution([encode(v) for v in dim.choices])
    return dists


def encode(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, list) else value


def decode(spec: SearchCreate, params: Mapping[str, Any]) -> dict[str, Any]:
    """Optuna's params back to spec values (list choices from their JSON text)."""
    decoded = {}
    for path, value in params.items():
        dim = spec.space[path]
        listed = isinstance(dim, Choice) and any(isinstance(c, list) for c in dim.choices)
        decoded[path] = json.loads(value) if listed and isinstance(value, str) else value
    return decoded


def grid_space(spec: SearchCreate) -> dict[str, list[Any]]:
    """The grid sampler's values per path (the schema refuses float ranges with it)."""
    space: dict[str, list[Any]] = {}
    for path, dim in spec.space.items():
        space[path] = dim.values() if isinstance(dim, IntRange) else [encode(v) for v in dim.choices]  # type: ignore[union-attr]
    return space


def grid_size(spec: SearchCreate) -> int:
    size = 1
    for values in grid_space(spec).values():
        size *= len(values)
    return size


class AskAndTellGridSampler(optuna.samplers.GridSampler):
    """Optuna's grid sampler without its stop: it calls `study.stop()` after the grid's last trial,
    which only works inside `study.optimize` (a RuntimeError on ask-and-tell's `tell`). A search's
    budget is its `trials`, checked at submit to be no larger than the grid."""

    def after_trial(
        self,
        study: optuna.Study,
        trial: optuna.trial.FrozenTrial,
        state: optuna.trial.TrialState,
        values: Sequence[float] | None,
    ) -> None:
        return None


def make_sampler(spec: SearchCreate, asked: int) -> optuna.samplers.BaseSampler:
    """The spec's sampler for asking trial number `asked` onwards. Every pass of a search builds a
    new sampler (in whichever process advances it), so a fixed seed is offset by the trials asked:
    the same seed every time would draw the same "random" values for every trial. The grid sampler
    keeps its seed as given."""
    seed = None if spec.sampler.seed is None else spec.sampler.seed + asked
    if spec.sampler.kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if spec.sampler.kind == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    if spec.sampler.kind == "grid":
        # Not offset: the seed shuffles the grid, and every pass must number it the same way
        # (the trials' grid ids in the storage say which points are taken).
        return AskAndTellGridSampler(grid_space(spec), seed=spec.sampler.seed)
    return optuna.samplers.TPESampler(seed=seed)


def make_pruner(spec: SearchCreate) -> optuna.pruners.BasePruner:
    pruner = spec.pruner
    if pruner.kind == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=pruner.startup_trials, n_warmup_steps=pruner.warmup_epochs
        )
    if pruner.kind == "hyperband":
        # max_resource "auto": the epochs of the first trial that completes.
        return optuna.pruners.HyperbandPruner(min_resource=1, reduction_factor=pruner.reduction_factor)
    return optuna.pruners.NopPruner()


def trial_experiment(spec: SearchCreate, name: str, params: Mapping[str, Any]) -> ExperimentCreate:
    """The experiment that trains one trial: one configuration (the trial's values) × the seeds."""
    return ExperimentCreate.model_validate(
        {
            "name": name,
            "base": spec.submitted_base(),
            "grid": {path: [value] for path, value in params.items()},
            "seeds": spec.seeds,
            "target": 0.85,
        }
    )


def planned_runs(spec: SearchCreate, name: str, params: Mapping[str, Any]) -> list[grid.PlannedRun]:
    """The trial's validated run specs, one per seed; raises SpaceError naming a bad value."""
    try:
        return grid.expand(trial_experiment(spec, name, params))
    except (grid.GridError, ValueError) as exc:
        shown = " ".join(f"{p}={v!r}" for p, v in params.items())
        raise SpaceError(f"the values {shown} make an invalid run: {_reason(exc)}") from exc


def _reason(exc: Exception) -> str:
    text = str(exc)
    return text.split("makes an invalid run: ", 1)[-1]


def corner_points(spec: SearchCreate) -> list[dict[str, Any]]:
    """Points that check every value a dimension can reach at its ends: each dimension's bounds
    (or every choice) with the others at their first value, and each start_with point."""
    first = {path: _values_to_check(dim)[0] for path, dim in spec.space.items()}
    points = [dict(first)]
    for path, dim in spec.space.items():
        for value in _values_to_check(dim)[1:]:
            points.append(first | {path: value})
    return points + [dict(p) for p in spec.start_with]


def _values_to_check(dim: FloatRange | IntRange | Choice) -> list[Any]:
    if isinstance(dim, Choice):
        return list(dim.choices)
    return [dim.low, dim.high]


def check_start_with(spec: SearchCreate) -> None:
    for point in spec.start_with:
        for path, value in point.items():
            if not _contains(spec.space[path], value):
                raise SpaceError(f"start_with: {path}={value!r} is outside its range in the space")


def _contains(dim: FloatRange | IntRange | Choice, value: Any) -> bool:
    if isinstance(dim, Choice):
        return any(repr(value) == repr(c) for c in dim.choices)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    if isinstance(dim, IntRange):
        return isinstance(value, int) and value in dim.values()
    return dim.low <= value <= dim.high


def aggregate(objective: Objective, values: list[float]) -> tuple[float, float, float | None]:
    """(objective value, mean, sample std or None with one seed) of the seeds' metric values."""
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else None
    spread = objective.k * (std or 0.0)
    if objective.aggregate == "mean_minus_k_std":
        return mean - spread, mean, std
    if objective.aggregate == "mean_plus_k_std":
        return mean + spread, mean, std
    return mean, mean, std
