"""Every sampler and pruner a spec can name drives Optuna's ask-and-tell as the search service does:
a fresh sampler per pass (seeded by the trials asked so far), the space's distributions fixed, and
the values decoded back into spec values inside the space."""

from __future__ import annotations

from typing import Any

import optuna
import pytest

from service.searches import space
from service.searches.schemas import Choice, FloatRange, IntRange, SearchCreate

SPACE = {
    "train.lr": {"type": "float", "low": 1e-4, "high": 0.3, "log": True},
    "train.epochs": {"type": "int", "low": 1, "high": 4},
    "model.hidden": {"type": "categorical", "choices": [[16], [32, 32]]},
}
GRID_SPACE = {"train.epochs": SPACE["train.epochs"], "model.hidden": SPACE["model.hidden"]}


def spec_for(sampler: str, pruner: str = "none", **changes: Any) -> SearchCreate:
    chosen = GRID_SPACE if sampler == "grid" else SPACE
    return SearchCreate.model_validate(
        {"name": "s", "space": chosen, "trials": 8, "sampler": {"kind": sampler, "seed": 3},
         "pruner": {"kind": pruner, "startup_trials": 1}} | changes
    )  # fmt: skip


def inside(spec: SearchCreate, params: dict[str, Any]) -> bool:
    for path, value in params.items():
        dim = spec.space[path]
        if isinstance(dim, FloatRange) and not dim.low <= value <= dim.high:
            return False
        if isinstance(dim, IntRange) and value not in dim.values():
            return False
        if isinstance(dim, Choice) and value not in dim.choices:
            return False
    return True


SAMPLERS = ["tpe", "random", "grid", "cmaes"]


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_each_sampler_asks_distinct_values_inside_the_space(sampler: str) -> None:
    spec = spec_for(sampler)
    study = optuna.create_study(direction=spec.direction())
    seen = []
    for asked in range(8):  # one pass per trial, as when each run's end advances the search
        fresh = optuna.load_study(
            study_name=study.study_name, storage=study._storage, sampler=space.make_sampler(spec, asked)
        )
        trial = fresh.ask(fixed_distributions=space.distributions(spec))
        params = space.decode(spec, trial.params)
        assert inside(spec, params), params
        seen.append(repr(sorted(params.items())))
        fresh.tell(trial, float(params["train.epochs"]))
    # The grid has 4 × 2 = 8 points: each once. The others draw 8 distinct points (a float in each).
    assert len(set(seen)) == 8


@pytest.mark.parametrize("pruner", ["median", "hyperband"])
def test_each_pruner_prunes_a_trial_far_behind(pruner: str) -> None:
    spec = spec_for("random", pruner)
    # Hyperband puts a trial in a bracket by hashing the study's name with the trial's number, and a
    # trial alone in its bracket is never pruned: 12 peers left one bracket empty for about 2 % of
    # random names, 30 for none of 200. The name is fixed so that a failure reproduces.
    study = optuna.create_study(
        study_name="pruner-test", direction="maximize", pruner=space.make_pruner(spec)
    )
    for _ in range(30):
        good = study.ask(fixed_distributions=space.distributions(spec))
        for step in range(1, 10):
            good.report(0.9, step)
            good.should_prune()  # as the search service asks after each reported epoch
        study.tell(good, 0.9)
    bad = study.ask(fixed_distributions=space.distributions(spec))
    pruned = False
    for step in range(1, 10):
        bad.report(0.1, step)
        if bad.should_prune():
            pruned = True
            break
    assert pruned
