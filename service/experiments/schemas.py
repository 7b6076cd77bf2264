"""Experiments (a grid of runs over one base spec), their reports and presets."""

from __future__ import annotations

import copy
from datetime import datetime
from typing import Annotated, Any, Literal, Self

from pydantic import (
    BaseModel,
    Field,
    ModelWrapValidatorHandler,
    PrivateAttr,
    model_validator,
)

from service.runs.schemas import (
    LABEL_PATTERN,
    STRICT,
    BuiltinDatasetName,
    NotBool,
    Notes,
    RunCreate,
    RunStatusName,
    Tags,
)

MAX_EXPERIMENT_RUNS = 64
# A dotted path into the run spec, e.g. `model.norm.kind` or `train.lr`; `train.seed` is set by
# `seeds` and `name` is derived, so neither can be a grid axis.
GridPath = Annotated[
    str, Field(pattern=r"^(dataset|model|train|compat)(\.[a-z_]{1,40}){0,4}$", max_length=120)
]
# A JSON scalar, or a list of integers (e.g. `model.hidden`); the point's spec decides if it fits.
GridValue = bool | int | float | Annotated[str, Field(max_length=64)] | list[Annotated[int, NotBool]] | None


class ExperimentCreate(BaseModel):
    """A grid of runs: the base spec with each grid point applied, once per seed."""

    model_config = STRICT

    name: str = Field(
        min_length=1,
        max_length=120,
        pattern=r"^[\w .,:;()+=@#%&!?'-]*$",
        description="Label; each run is named '<name>: <grid point> seed=<seed>'. Same characters as "
        "a run name.",
    )
    base: RunCreate = Field(
        default_factory=RunCreate,
        description="The run spec every run starts from (as POST /api/v1/runs); the grid overrides it.",
    )
    grid: dict[GridPath, Annotated[list[GridValue], Field(min_length=1, max_length=16)]] = Field(
        default_factory=dict,
        max_length=6,
        description='Dotted spec paths and the values to try, e.g. {"model.norm.kind": ["none", '
        '"batch"], "train.lr": [0.001, 0.01]}: one configuration per combination.',
    )
    seeds: list[Annotated[int, NotBool, Field(ge=0, le=2**31 - 1)]] = Field(
        [0, 1, 2],
        min_length=1,
        max_length=16,
        description="train.seed of each configuration's runs: for a given seed every configuration sees "
        "the same initialisation seed and data order.",
    )
    target: Annotated[float, NotBool] = Field(
        0.85, gt=0, le=1, description="Validation accuracy the report's epochs-to-target counts up to."
    )
    # The base as the client wrote it. Grid points apply to this, not to the normalised `base`:
    # normalising fills fields that depend on others (adam_eps on compat, momentum from
    # keras_momentum), and a point changing `compat` or `keras_momentum` must re-derive them.
    _submitted_base: dict[str, Any] = PrivateAttr(default_factory=dict)

    @model_validator(mode="wrap")
    @classmethod
    def _keep_submitted_base(cls, data: Any, handler: ModelWrapValidatorHandler[Self]) -> Self:
        experiment = handler(data)
        submitted = data.get("base") if isinstance(data, dict) else None
        experiment._submitted_base = (
            copy.deepcopy(submitted)
            if isinstance(submitted, dict)
            else experiment.base.model_dump(mode="json", exclude_unset=True)
        )
        return experiment

    def submitted_base(self) -> dict[str, Any]:
        """A fresh copy of the base spec as submitted (only what the client set)."""
        return copy.deepcopy(self._submitted_base)

    @model_validator(mode="after")
    def _distinct(self) -> Self:
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError("seeds must be distinct")
        if "train.seed" in self.grid:
            raise ValueError("train.seed cannot be a grid axis: list the seeds in `seeds`")
        for path, values in self.grid.items():
            if len({repr(v) for v in values}) != len(values):
                raise ValueError(f"grid values of {path} must be distinct")
        return self


class ExperimentRunPublic(BaseModel):
    id: str = Field(description="The run's id (GET /api/v1/runs/{id}).")
    name: str | None = Field(description="The derived run name.")
    status: RunStatusName = Field(description="The run's state.")
    grid_point: dict[str, Any] = Field(description="The grid values this run trains (dotted path → value).")
    config: str = Field(description="The configuration's label, e.g. 'norm=batch lr=0.01'.")
    seed: int = Field(description="train.seed of this run.")
    epochs_done: int = Field(description="Epochs finished so far.")
    epochs_total: int = Field(description="Epochs asked for.")
    val_loss: float | None = Field(description="Validation loss of the last finished epoch.")
    val_accuracy: float | None = Field(description="Validation accuracy of the last finished epoch.")


class ExperimentPatch(BaseModel):
    """What PATCH /api/v1/experiments/{id} may change; the fields left out stay as they are. Its
    runs keep the names they were given."""

    model_config = STRICT

    # `str` with no value by default: an experiment always has a name, so null is refused (422) and
    # the schema says so; leaving the field out keeps the current one (the default is never stored:
    # the route applies only the fields sent). Hence the ignore: None is no `str`.
    name: str = Field(None, min_length=1, max_length=120, pattern=LABEL_PATTERN, description="New label.")  # type: ignore[assignment]
    tags: Tags | None = None
    notes: Notes | None = Field(None, description="Free text; null removes it.")


class ExperimentPublic(BaseModel):
    id: str = Field(description="Server-generated experiment id.")
    name: str = Field(description="The experiment's label.")
    tags: list[str] = Field(default_factory=list, description="Tags set by PATCH.")
    notes: str | None = Field(None, description="Notes set by PATCH.")
    preset: str | None = Field(description="The ready-made experiment it came from, if any.")
    spec: ExperimentCreate = Field(description="The normalised experiment spec.")
    status_counts: dict[RunStatusName, int] = Field(description="How many of its runs are in each state.")
    finished: bool = Field(description="Every run has ended (succeeded, failed or cancelled).")
    created_at: datetime = Field(description="When it was submitted.")
    runs: list[ExperimentRunPublic] = Field(description="Its runs, by configuration then seed.")


class ExperimentsPublic(BaseModel):
    items: list[ExperimentPublic] = Field(description="Experiments, newest first.")
    total: int = Field(description="Experiments in all.")
    limit: int = Field(description="Page size asked for.")
    offset: int = Field(description="Experiments skipped.")


class ExperimentReportStat(BaseModel):
    mean: float | None = Field(
        description="Mean over the finished seeds; null when none, or a value is not finite."
    )
    std: float | None = Field(
        description="Sample standard deviation (ddof=1) over the seeds; null with fewer than 2."
    )
    n: int = Field(description="Seeds it is computed over.")
    values: list[float | None] = Field(description="Per seed, in seed order; null for a non-finite value.")


class ExperimentReportEpochs(BaseModel):
    target: float = Field(description="The validation accuracy to reach.")
    per_seed: dict[str, int | None] = Field(
        description="Seed → first epoch whose val_accuracy ≥ target; null when never reached."
    )
    reached: int = Field(description="Seeds that reached it.")
    mean: float | None = Field(description="Mean epoch over the seeds that reached it; null when none did.")


class ExperimentReportConfig(BaseModel):
    config: str = Field(description="The configuration's label.")
    grid_point: dict[str, Any] = Field(description="Its grid values (dotted path → value).")
    runs: int = Field(description="Its runs (one per seed).")
    succeeded: int = Field(
        description="Runs that succeeded: the statistics are over these (and the diverged)."
    )
    unfinished: int = Field(description="Runs still queued or running.")
    failed: int = Field(description="Runs that failed or were cancelled.")
    diverged: int = Field(
        0,
        description="Of the failed runs, those whose loss became NaN or infinite: they enter `final` and "
        "`best` as null values, so the configuration's mean is null.",
    )
    final: dict[str, ExperimentReportStat] = Field(
        description="Last-epoch val_accuracy, val_loss, train_accuracy, train_loss over the succeeded and "
        "diverged seeds."
    )
    best: dict[str, ExperimentReportStat] = Field(
        description="Best epoch per seed (max accuracy, min loss), then mean ± std over the seeds."
    )
    epochs_to_target: ExperimentReportEpochs = Field(description="Epochs to reach the target accuracy.")


class ExperimentReportWinner(BaseModel):
    metric: str = Field(description="e.g. final.val_accuracy, best.val_loss, epochs_to_target.")
    better: Literal["higher", "lower"] = Field(description="Which direction wins.")
    config: str = Field(description="The winning configuration.")
    mean: float = Field(description="Its mean.")
    runner_up: str | None = Field(description="The second best configuration, if any.")
    runner_up_mean: float | None = Field(description="Its mean.")


class ExperimentReportClaim(BaseModel):
    claim: str = Field(description="The sentence under test.")
    verdict: Literal["supported", "not supported", "inconclusive"] = Field(
        description="By the rule in `verdict_rule` of the report."
    )
    evidence: str = Field(description="The numbers behind the verdict.")
    difference: float | None = Field(description="The contrast: positive means the claim's direction.")
    noise: float | None = Field(description="Two standard errors of the contrast, from the seed spread.")


class ExperimentReportPublic(BaseModel):
    experiment_id: str = Field(description="The experiment.")
    name: str = Field(description="Its label.")
    preset: str | None = Field(description="The ready-made experiment, if any.")
    target: float = Field(description="Validation accuracy used for epochs-to-target.")
    finished: bool = Field(description="Every run has ended: the figures will not change.")
    configurations: list[ExperimentReportConfig] = Field(description="Per configuration, in grid order.")
    winners: list[ExperimentReportWinner] = Field(description="The best configuration per metric.")
    claims: list[ExperimentReportClaim] = Field(description="For presets: each claim and its verdict.")
    verdict_rule: str = Field(description="How claims are judged.")


class PresetPublic(BaseModel):
    name: str = Field(description="Use with POST /api/v1/presets/{name}.")
    claim: str = Field(description="What the experiment tests.")
    dataset: str = Field(description="The dataset it trains on, as posted now (installed datasets decide).")
    grid: dict[str, list[Any]] = Field(description="Its grid.")
    seeds: list[int] = Field(description="Default seeds.")
    runs: int = Field(description="Runs it creates with the default seeds.")
    estimated_seconds: int = Field(
        description="Rough wall time with the worker's training processes (BNLAB_WORKER_CONCURRENCY as the"
        " API sees it), from a per-step cost model measured on a 2-core CPU."
    )


class PresetsPublic(BaseModel):
    items: list[PresetPublic] = Field(description="Every ready-made experiment.")


class PresetCreate(BaseModel):
    """Optional overrides for a ready-made experiment."""

    model_config = STRICT

    seeds: list[Annotated[int, NotBool, Field(ge=0, le=2**31 - 1)]] | None = Field(
        None, min_length=1, max_length=16, description="Seeds to run instead of the preset's."
    )
    dataset: BuiltinDatasetName | None = Field(
        None, description="A built-in dataset instead of the preset's (uploads need their own experiment)."
    )
    name: str | None = Field(
        None,
        min_length=1,
        max_length=120,
        pattern=r"^[\w .,:;()+=@#%&!?'-]*$",
        description="Experiment label.",
    )
