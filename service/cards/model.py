"""What a card is: the paper's side (claim, citation, setup, figures), bnlab's side (a base run spec,
one or more grids, sizes per scale), the pre-declared contrasts its verdicts come from, and the
figure that redraws the paper's from bnlab's runs. Plain frozen dataclasses: the catalogue is code,
reviewed and versioned, so every contrast is fixed before any run starts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from service.experiments.report import Term  # one configuration of a contrast and its coefficient

Scale = Literal["test", "quick", "full"]
SCALES: tuple[Scale, ...] = ("test", "quick", "full")
# The test scale exercises the wiring only (seconds per card): synthetic data, one epoch, two seeds.
TEST_DATASET = "synthetic"
TEST_LIMIT = 240
TEST_SEEDS = (0, 1)


@dataclass(frozen=True)
class Sizes:
    """How big a scale is: epochs, seeds, and the training samples drawn (None: the whole dataset)."""

    epochs: int
    seeds: tuple[int, ...]
    limit: int | None


@dataclass(frozen=True)
class Contrast:
    """A claim as a linear contrast Σ cᵢ·metric(configᵢ), evaluated per seed. `direction` +1: the claim
    says the contrast is positive; −1: negative. `smallest`: the smallest |contrast| that counts, in the
    metric's units. `paper_effect`: the paper's own value of the same contrast, only from a figure
    marked verified (None: the paper gives the direction only, or no verified number)."""

    name: str
    sentence: str
    metric: str
    terms: tuple[Term, ...]
    direction: Literal[1, -1]
    smallest: float
    words: str  # the contrast in words, e.g. "batch − none at lr 0.3"
    paper_effect: float | None = None
    paper_effect_source: str = ""


@dataclass(frozen=True)
class PaperFigure:
    text: str
    verified: bool


@dataclass(frozen=True)
class FigureSpec:
    """curves: `metric` per epoch per configuration (mean ± sd over seeds), as the BN paper's Fig. 1.
    versus: `metric` (final value per seed) against the grid key `x`, one line per value of `series`,
    mean ± sd, as GN's error-vs-batch curves. `error`: draw 1 − accuracy, as the paper does."""

    kind: Literal["curves", "versus"]
    metric: str
    title: str
    x: str | None = None
    series: str | None = None
    error: bool = False
    log_x: bool = False


@dataclass(frozen=True)
class Card:
    name: str
    title: str
    citation: str
    claim: str  # the paper's claim; quoted words are in quotation marks, the rest paraphrase
    paper_setup: str
    paper_figures: tuple[PaperFigure, ...]
    setup: str  # bnlab's scaled-down setup
    differences: str  # what differs from the paper, and why that may matter
    base: dict[str, Any]  # a run spec without dataset name, epochs, seeds or limit
    parts: tuple[dict[str, list[Any]], ...]  # one grid per experiment the card starts
    datasets: tuple[str, ...]  # the first installed one is used
    sizes: dict[Scale, Sizes]
    contrasts: tuple[Contrast, ...]
    figure: FigureSpec
    # In words, the features the card needs that main lacked when it was written (empty: none). Whether
    # this build has them is checked, not read from here: a contrast's metric must have an extractor
    # (verdicts.metric_available) and the card's grids must expand into valid runs.
    needs: str = ""
    target: float = 0.85
