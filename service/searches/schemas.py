"""Searches: Optuna asks for hyperparameters over dotted spec paths; each trial trains its seeds."""

from __future__ import annotations

import copy
from datetime import datetime
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, Field, ModelWrapValidatorHandler, PrivateAttr, model_validator

from service.experiments.schemas import GridPath, GridValue
from service.runs.schemas import LABEL_PATTERN, STRICT, BuiltinDatasetName, NotBool, RunCreate

MAX_TRIALS = 200
MAX_SEARCH_RUNS = 400  # trials × seeds
Number = Annotated[float, NotBool]


class FloatRange(BaseModel):
    """A float between low and high, sampled uniformly, or log-uniformly with `log`."""

    model_config = STRICT
    type: Literal["float"]
    low: Number = Field(description="Smallest value.")
    high: Number = Field(description="Largest value.")
    log: bool = Field(False, description="Sample log-uniformly (both bounds > 0): for learning rates.")

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if not self.low < self.high:
            raise ValueError(f"low ({self.low:g}) must be below high ({self.high:g})")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0 (got {self.low:g})")
        return self


class IntRange(BaseModel):
    """An integer between low and high inclusive, every `step`, or log-uniformly with `log`."""

    model_config = STRICT
    type: Literal["int"]
    low: Annotated[int, NotBool] = Field(description="Smallest value.")
    high: Annotated[int, NotBool] = Field(description="Largest value.")
    step: Annotated[int, NotBool] = Field(1, ge=1, description="Spacing of the values (1 with `log`).")
    log: bool = Field(False, description="Sample log-uniformly (low ≥ 1).")

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.log and (self.low < 1 or self.step != 1):
            raise ValueError("a log range needs low ≥ 1 and step 1")
        return self

    def values(self) -> list[int]:
        return list(range(self.low, self.high + 1, self.step))


class Choice(BaseModel):
    """One of the listed values."""

    model_config = STRICT
    type: Literal["categorical"]
    choices: list[GridValue] = Field(min_length=1, max_length=32, description="The values to choose among.")

    @model_validator(mode="after")
    def _distinct(self) -> Self:
        if len({repr(v) for v in self.choices}) != len(self.choices):
            raise ValueError("choices must be distinct")
        return self


Dimension = Annotated[FloatRange | IntRange | Choice, Field(discriminator="type")]
MetricName = Literal["val_accuracy", "val_loss", "train_accuracy", "train_loss"]


class Objective(BaseModel):
    """What a trial scores: each seed's last-epoch `metric`, aggregated over the seeds."""

    model_config = STRICT
    metric: MetricName = Field("val_accuracy", description="The metric of each seed's last epoch.")
    direction: Literal["maximize", "minimize"] | None = Field(
        None, description="Default: maximize accuracies, minimize losses."
    )
    aggregate: Literal["mean", "mean_minus_k_std", "mean_plus_k_std"] = Field(
        "mean",
        description="The seeds' mean, or a robust score that penalises spread: mean − k·std when "
        "maximizing, mean + k·std when minimizing (sample std, ddof=1).",
    )
    k: Number = Field(1.0, ge=0, le=10, description="The std's weight in a robust aggregate.")

    @model_validator(mode="after")
    def _direction(self) -> Self:
        if self.direction is None:
            self.direction = "maximize" if self.metric.endswith("accuracy") else "minimize"
        wrong = {"maximize": "mean_plus_k_std", "minimize": "mean_minus_k_std"}[self.direction]
        if self.aggregate == wrong:
            right = "mean_minus_k_std" if self.direction == "maximize" else "mean_plus_k_std"
            raise ValueError(f"{self.aggregate} rewards spread when you {self.direction}: use {right}")
        return self


class Sampler(BaseModel):
    model_config = STRICT
    kind: Literal["tpe", "random", "cmaes", "grid"] = Field("tpe", description="Optuna's sampler.")
    seed: Annotated[int, NotBool] | None = Field(None, ge=0, le=2**31 - 1, description="The sampler's seed.")


class Pruner(BaseModel):
    """Stops a trial whose seeds' mean validation metric per epoch falls behind (all seeds together)."""

    model_config = STRICT
    kind: Literal["none", "median", "hyperband"] = Field("none", description="Optuna's pruner.")
    startup_trials: Annotated[int, NotBool] = Field(
        5, ge=0, le=100, description="median: trials that complete before any is pruned."
    )
    warmup_epochs: Annotated[int, NotBool] = Field(
        0, ge=0, le=1000, description="median: epochs before a trial may be pruned."
    )
    reduction_factor: Annotated[int, NotBool] = Field(3, ge=2, le=10, description="hyperband's η.")


class SearchCreate(BaseModel):
    """A hyperparameter search over a base run spec: Optuna proposes values for the space's dotted
    paths; each trial trains once per seed and is scored by the objective over its seeds."""

    model_config = STRICT

    name: str = Field(min_length=1, max_length=120, pattern=LABEL_PATTERN, description="Label.")
    base: RunCreate = Field(default_factory=RunCreate, description="The run spec every trial starts from.")
    space: dict[GridPath, Dimension] = Field(
        min_length=1,
        max_length=8,
        description='Dotted spec paths and their ranges, e.g. {"train.lr": {"type": "float", "low": 1e-4, '
        '"high": 0.3, "log": true}, "model.norm.kind": {"type": "categorical", "choices": ["none", '
        '"batch"]}}.',
    )
    trials: Annotated[int, NotBool] = Field(12, ge=1, le=MAX_TRIALS, description="Trials to run in all.")
    seeds: list[Annotated[int, NotBool, Field(ge=0, le=2**31 - 1)]] = Field(
        [0, 1, 2], min_length=1, max_length=16, description="train.seed of each trial's runs."
    )
    objective: Objective = Field(default_factory=Objective)
    sampler: Sampler = Field(default_factory=Sampler)
    pruner: Pruner = Field(default_factory=Pruner)
    max_in_flight: Annotated[int, NotBool] = Field(
        2, ge=1, le=32, description="Trials training at once (each with all its seeds)."
    )
    start_with: list[dict[GridPath, GridValue]] = Field(
        default_factory=list,
        max_length=16,
        description="Points to try first (Optuna's enqueue_trial), each giving a value for every "
        "path of the space.",
    )
    # The base as the client wrote it: trial values apply to this (see ExperimentCreate).
    _submitted_base: dict[str, Any] = PrivateAttr(default_factory=dict)

    @model_validator(mode="wrap")
    @classmethod
    def _keep_submitted_base(cls, data: Any, handler: ModelWrapValidatorHandler[Self]) -> Self:
        search = handler(data)
        submitted = data.get("base") if isinstance(data, dict) else None
        search._submitted_base = (
            copy.deepcopy(submitted)
            if isinstance(submitted, dict)
            else search.base.model_dump(mode="json", exclude_unset=True)
        )
        return search

    def submitted_base(self) -> dict[str, Any]:
        return copy.deepcopy(self._submitted_base)

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError("seeds must be distinct")
        if "train.seed" in self.space:
            raise ValueError("train.seed cannot be searched: list the seeds in `seeds`")
        if self.objective.aggregate != "mean" and len(self.seeds) < 2:
            raise ValueError(f"{self.objective.aggregate} needs at least 2 seeds (a std)")
        if self.trials * len(self.seeds) > MAX_SEARCH_RUNS:
            raise ValueError(
                f"trials × seeds = {self.trials * len(self.seeds)} runs; the limit is {MAX_SEARCH_RUNS}"
            )
        if self.sampler.kind == "grid":
            for path, dim in self.space.items():
                if isinstance(dim, FloatRange):
                    raise ValueError(f"the grid sampler needs listed values: {path} is a float range")
        if self.sampler.kind == "cmaes" and all(isinstance(d, Choice) for d in self.space.values()):
            raise ValueError("cmaes searches numeric ranges: the space has only categoricals (use tpe)")
        for point in self.start_with:
            if set(point) != set(self.space):
                raise ValueError(f"start_with points give a value for each of {sorted(self.space)}")
        return self

    def direction(self) -> Literal["maximize", "minimize"]:
        return self.objective.direction or "maximize"


TrialState = Literal["running", "complete", "pruned", "failed"]


class TrialPublic(BaseModel):
    number: int = Field(description="Optuna's trial number (0, 1, …).")
    state: TrialState = Field(description="running, complete, pruned or failed (cancelled ones fail).")
    params: dict[str, Any] = Field(description="The values tried (dotted path → value).")
    experiment_id: str | None = Field(description="The experiment that trains its seeds.")
    value: float | None = Field(description="The objective told to Optuna (complete trials).")
    mean: float | None = Field(description="The seeds' mean of the metric (last epoch).")
    std: float | None = Field(description="Their sample std (ddof=1); null with one seed.")
    values: list[float | None] = Field(description="Per seed, in seed order (null: no finished epoch).")
    error: str | None = Field(description="Why it failed, if it did.")


class SearchPublic(BaseModel):
    id: str = Field(description="Server-generated search id.")
    name: str = Field(description="The search's label.")
    status: Literal["running", "finished", "cancelled", "failed"] = Field(description="The search's state.")
    error: str | None = Field(description="Why it failed, if it did.")
    spec: SearchCreate = Field(description="The normalised search spec.")
    study_name: str = Field(description="Its Optuna study in bnlab's database (optuna.load_study).")
    created_at: datetime = Field(description="When it was submitted.")
    finished_at: datetime | None = Field(description="When its last trial ended.")
    trial_counts: dict[TrialState, int] = Field(description="Trials in each state.")
    best: TrialPublic | None = Field(description="The best complete trial by the objective.")
    trials: list[TrialPublic] = Field(description="Every trial asked so far, by number.")
    importances: dict[str, float] | None = Field(
        None,
        description="Parameter importances (sum 1), most important first; with ≥ 2 complete trials, on "
        "GET /api/v1/searches/{id} only.",
    )
    importance_method: Literal["fanova"] | None = Field(
        None, description="How the importances were computed: fanova, Optuna's fANOVA evaluator."
    )


class SearchesPublic(BaseModel):
    items: list[SearchPublic] = Field(description="Searches, newest first (without importances).")
    total: int = Field(description="Searches in all.")
    limit: int = Field(description="Page size asked for.")
    offset: int = Field(description="Searches skipped.")


class SearchPresetCreate(BaseModel):
    """What a preset's searches may change, each the same way (all optional)."""

    model_config = STRICT

    trials: Annotated[int, NotBool] | None = Field(
        None, ge=1, le=MAX_TRIALS, description="Trials per search."
    )
    seeds: list[Annotated[int, NotBool, Field(ge=0, le=2**31 - 1)]] | None = Field(
        None, min_length=1, max_length=16, description="train.seed of each trial's runs."
    )
    dataset: BuiltinDatasetName | None = Field(
        None, description="A built-in dataset instead of the preset's."
    )
    limit: Annotated[int, NotBool] | None = Field(None, ge=2, description="Use the first N samples.")
    epochs: Annotated[int, NotBool] | None = Field(None, ge=1, le=1000, description="Epochs of every run.")


class SearchPresetPublic(BaseModel):
    name: str
    claim: str = Field(description="The claim the preset asks, and how.")
    searches: list[dict[str, Any]] = Field(description="The searches it starts (SearchCreate specs).")


class SearchPresetsPublic(BaseModel):
    items: list[SearchPresetPublic]


class SearchPresetStarted(BaseModel):
    preset: str
    searches: list[SearchPublic] = Field(description="The searches started, in the preset's order.")
