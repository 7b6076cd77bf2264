"""Request and response models of /api/v1/cards and /api/v1/replications."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.runs.schemas import BuiltinDatasetName, NotBool

STRICT = ConfigDict(extra="forbid", allow_inf_nan=False)


class CardCreate(BaseModel):
    """Optional overrides for a card run."""

    model_config = STRICT

    seeds: list[Annotated[int, NotBool, Field(ge=0, le=2**31 - 1)]] | None = Field(
        None, min_length=2, max_length=16, description="Seeds to run instead of the scale's (at least 2)."
    )
    dataset: BuiltinDatasetName | None = Field(
        None, description="A built-in dataset instead of the card's first installed one."
    )
    scale: Literal["test", "quick", "full"] = Field(
        "quick",
        description="quick: within about 5 minutes on a 2-core CPU; full: as large as is useful there; test: "
        "seconds, synthetic data, one epoch, two seeds (checks the wiring, not the claim).",
    )


class PaperFigurePublic(BaseModel):
    text: str = Field(description="A figure of the paper.")
    verified: bool = Field(
        description="Read in the paper or its official code. Only verified figures are quoted as the "
        "paper's numbers."
    )


class ContrastPublic(BaseModel):
    name: str = Field(description="The claim's short name.")
    sentence: str = Field(description="The claim as bnlab tests it.")
    metric: str = Field(description="final.X, best.X, mean.X (over epochs), shift.* or probe.*, per run.")
    terms: list[dict[str, Any]] = Field(description="The configurations (grid values) and coefficients.")
    contrast: str = Field(description="The contrast in words.")
    direction: Literal["positive", "negative"] = Field(description="The sign the claim predicts.")
    smallest: float = Field(description="The smallest |contrast| that counts, in the metric's units.")
    paper_effect: float | None = Field(
        description="The paper's value of this contrast (verified figures only)."
    )


class CardPublic(BaseModel):
    name: str = Field(description="Use with POST /api/v1/cards/{name}.")
    title: str = Field(description="One line.")
    citation: str = Field(description="The paper.")
    claim: str = Field(
        description="The paper's claim (quoted words in quotation marks; the rest paraphrase)."
    )
    paper_setup: str = Field(description="The paper's experiment.")
    paper_figures: list[PaperFigurePublic] = Field(description="Its headline figures.")
    setup: str = Field(description="bnlab's scaled-down experiment.")
    differences: str = Field(description="What differs from the paper, and why it may matter.")
    available: bool = Field(description="Whether this build can run the card.")
    unavailable_reason: str | None = Field(description="What is missing, when it cannot.")
    dataset: str = Field(description="The dataset a run would use now.")
    grids: list[dict[str, list[Any]]] = Field(description="One grid per experiment the card starts.")
    base: dict[str, Any] = Field(description="The run spec every configuration starts from.")
    sizes: dict[str, dict[str, Any]] = Field(description="Per scale: epochs, seeds, samples.")
    runs: dict[str, int] = Field(description="Runs per scale.")
    estimated_seconds: dict[str, int] = Field(
        description="Wall time per scale from the cost model, with the worker's training processes."
    )
    claims: list[ContrastPublic] = Field(description="The pre-declared contrasts, fixed before any run.")
    figure: dict[str, Any] = Field(description="What the card's figure draws.")
    last_run: CardRunSummary | None = Field(None, description="The latest run of the card, if any.")


class CardsPublic(BaseModel):
    items: list[CardPublic] = Field(description="Every card.")


class CardRunSummary(BaseModel):
    id: str = Field(description="The card run: the id of its first experiment.")
    scale: str = Field(description="test, quick or full.")
    experiments: list[str] = Field(description="Its experiments (one per grid).")
    created_at: datetime = Field(description="When it was started.")


class ClaimReport(BaseModel):
    name: str = Field(description="The claim's short name.")
    sentence: str = Field(description="The claim.")
    metric: str = Field(description="Its metric.")
    contrast: str = Field(description="The contrast in words.")
    direction: Literal["positive", "negative"] = Field(description="The sign the claim predicts.")
    smallest: float = Field(description="The smallest effect that counts.")
    per_seed: dict[str, float] = Field(description="The contrast at each seed that counted.")
    dropped_seeds: list[int] = Field(description="Seeds left out: a run failed or gave a non-finite value.")
    n: int = Field(description="Seeds that counted.")
    effect: float | None = Field(description="Mean of the per-seed contrast.")
    ci_low: float | None = Field(description="95 % paired t interval, low end.")
    ci_high: float | None = Field(description="95 % paired t interval, high end.")
    bootstrap_low: float | None = Field(description="95 % BCa bootstrap interval over seeds (n ≥ 8).")
    bootstrap_high: float | None = Field(description="95 % BCa bootstrap interval, high end.")
    p_value: float | None = Field(description="Two-sided p-value of the one-sample t-test on the contrast.")
    adjusted_p: float | None = Field(description="Holm–Bonferroni adjusted across the card's claims.")
    hedges_g: float | None = Field(description="Hedges' g (d_z with the small-sample correction).")
    seeds_for_power: int | None = Field(description="Seeds for 80 % power at the smallest effect.")
    verdict: Literal["supported", "contradicted", "inconclusive"] | None = Field(
        description="By the pre-declared rule; null while runs are unfinished."
    )
    reason: str | None = Field(
        description="Why inconclusive: too few seeds, effect below the smallest, runs failed."
    )
    paper_effect: float | None = Field(description="The paper's value (verified figures only).")
    paper_comparison: str = Field(description="Same direction, same order of magnitude, or not.")


class CardReportPublic(BaseModel):
    card: str = Field(description="The card.")
    run_id: str = Field(description="The card run (its first experiment's id).")
    scale: str = Field(description="test, quick or full.")
    dataset: str = Field(description="The dataset it trained on.")
    experiments: list[str] = Field(description="Its experiments (GET /api/v1/experiments/{id}/report).")
    finished: bool = Field(description="Every run has ended.")
    runs: dict[str, int] = Field(description="Runs by state.")
    created_at: datetime = Field(description="Started.")
    finished_at: datetime | None = Field(description="When the last run ended.")
    measured_seconds: float | None = Field(description="From the start to the last run's end.")
    estimated_seconds: int = Field(description="The cost model's estimate for this run.")
    claims: list[ClaimReport] = Field(description="Each pre-declared claim with its statistics and verdict.")
    summary: str = Field(
        description="What the data show, and how it compares with the paper, in one sentence."
    )
    verdict_rule: str = Field(description="The fixed rule the verdicts follow.")
    figure_png: str = Field(description="The card's figure from these runs (PNG).")
    figure_svg: str = Field(description="The same figure as SVG.")


class ReplicationPublic(BaseModel):
    card: str = Field(description="The card.")
    title: str = Field(description="One line.")
    available: bool = Field(description="Whether this build can run it.")
    unavailable_reason: str | None = Field(description="What is missing.")
    estimated_seconds: int = Field(description="Quick scale, from the cost model.")
    last_run: str | None = Field(description="The latest card run's id.")
    scale: str | None = Field(description="Its scale.")
    ran_at: datetime | None = Field(description="When it started.")
    measured_seconds: float | None = Field(description="How long it took (null while running).")
    finished: bool | None = Field(description="Whether every run ended.")
    verdicts: dict[str, str] = Field(description="Claim name → verdict (with the reason when inconclusive).")
    summary: str | None = Field(description="The one-sentence summary.")


class ReplicationsPublic(BaseModel):
    items: list[ReplicationPublic] = Field(description="Every card and its latest run.")


CardPublic.model_rebuild()
