"""Named searches: an article claim asked as searches rather than as a fixed grid.

`higher-lr` as a grid compares BN and no norm at two learning rates picked in advance; asked properly
("BN allows higher learning rates"), each network gets its own best learning rate, found by a search
over the same range with the same budget, and the claim is about where those optima lie and how well
each network does at its own. A preset is a list of searches started together.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from service.searches.schemas import SearchCreate, SearchPresetCreate


@dataclass(frozen=True)
class SearchPreset:
    name: str
    claim: str
    searches: tuple[dict[str, Any], ...]  # SearchCreate specs, started in this order


def _best_lr(kind: str, label: str) -> dict[str, Any]:
    return {
        "name": f"best lr, {label}",
        "base": {
            "dataset": {"name": "fashion-mnist", "limit": 10000},
            "model": {
                "hidden": [128, 128],
                "activation": "relu",
                "norm": {"kind": kind, "position": "before_activation"},
            },
            "train": {"epochs": 4, "batch_size": 32, "optimizer": "sgd", "momentum": 0.9},
        },
        "space": {"train.lr": {"type": "float", "low": 0.001, "high": 3.0, "log": True}},
        "trials": 8,
        "seeds": [0, 1, 2],
        "objective": {"metric": "val_accuracy", "aggregate": "mean"},
        "sampler": {"kind": "tpe", "seed": 0},
        "pruner": {"kind": "median", "startup_trials": 3},
    }


SEARCH_PRESETS: dict[str, SearchPreset] = {
    preset.name: preset
    for preset in (
        SearchPreset(
            name="best-lr-with-and-without-bn",
            claim="BN allows higher learning rates (BN paper §3.3), asked as two searches: the best "
            "SGD learning rate of the same 2×128 ReLU network with BN and without, over the same "
            "range (0.001–3, log scale) and budget (8 trials × 3 seeds each).",
            searches=(_best_lr("batch", "with BN"), _best_lr("none", "without BN")),
        ),
    )
}


def preset_searches(preset: SearchPreset, overrides: SearchPresetCreate) -> list[SearchCreate]:
    """The preset's searches with the overrides applied (each the same way)."""
    specs = []
    for raw in preset.searches:
        spec = copy.deepcopy(raw)
        if overrides.trials is not None:
            spec["trials"] = overrides.trials
        if overrides.seeds is not None:
            spec["seeds"] = list(overrides.seeds)
        if overrides.dataset is not None:
            spec["base"]["dataset"] = {"name": overrides.dataset}
        if overrides.limit is not None:
            spec["base"]["dataset"]["limit"] = overrides.limit
        if overrides.epochs is not None:
            spec["base"]["train"]["epochs"] = overrides.epochs
        specs.append(SearchCreate.model_validate(spec))
    return specs
