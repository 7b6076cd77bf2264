"""Experiments: a grid of run specs (the report over their results is in `report`).

Grid expansion applies each grid point (dotted spec path -> value) to the base spec and validates the
result as a `RunCreate`, so a point that makes no valid run is refused before anything is stored.

The report works on plain rows (`RunResult`), so its arithmetic is tested on hand-made numbers:
statistics are over the *succeeded* runs of a configuration, one value per seed; the standard
deviation is the sample one (ddof=1) and is null with a single seed (no spread is known).

Claims (for presets) are linear contrasts of configuration means, judged by `VERDICT_RULE`.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from service.experiments.schemas import (
    MAX_EXPERIMENT_RUNS,
    ExperimentCreate,
)
from service.runs.schemas import RunCreate

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
