"""Statistics a reviewer would accept for a claim comparing two configurations over seeds.

Per claim: the effect (a difference of means, or the mean of paired differences when seeds pair the
runs) with a 95 % t interval (Welch's, or the paired one), a BCa bootstrap interval over seeds once
there are enough of them, the two-sided p-value, Hedges' g, and the number of seeds per
configuration that 80 % power needs to detect the smallest effect that counts. Across a card's
claims the p-values are Holm–Bonferroni adjusted. scipy does the distributions; the formulas that
scipy has no function for (Hedges' correction, Holm's step-down, the power search) are written out
with their sources. scipy is imported where it is used: scipy.stats added about half a second (a seventh)
to the API's start, and only the reports need it.

The verdict rule is fixed before any run (see `judge`):
- supported: the adjusted p-value is below α, the effect points the claimed way, and its size
  reaches the smallest effect that counts;
- contradicted: the adjusted p-value is below α and the effect points the other way;
- inconclusive, with its reason: runs failed (fewer than two results on a side), the effect is
  below the smallest that counts (significant but small, or an interval that stays under it), or
  too few seeds (neither significant nor ruled out: `seeds_for_power` says how many would do).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

ALPHA = 0.05
CONFIDENCE = 0.95
POWER = 0.8
# From this many seeds per side a bootstrap interval is reported beside the t interval; below it the
# bootstrap distribution has too few distinct resamples to mean much.
BOOTSTRAP_MIN_SEEDS = 8
BOOTSTRAP_RESAMPLES = 9999
MAX_SEEDS_SEARCHED = 10_000

Verdict = Literal["supported", "contradicted", "inconclusive"]
Reason = Literal["runs failed", "effect below the smallest that counts", "too few seeds"]


@dataclass(frozen=True)
class Comparison:
    """`a` against `b`: effect = mean(a) − mean(b) (or the mean of the paired differences a − b)."""

    effect: float
    ci_low: float
    ci_high: float
    p_value: float
    hedges_g: float | None  # None when neither side varies (the effect is then exact)
    n_a: int
    n_b: int
    paired: bool
    bootstrap_low: float | None = None
    bootstrap_high: float | None = None
    seeds_for_power: int | None = None  # per configuration; None: more than MAX_SEEDS_SEARCHED


@dataclass(frozen=True)
class Judgement:
    verdict: Verdict
    reason: Reason | None
    adjusted_p: float


def compare(
    a: Sequence[float], b: Sequence[float], *, paired: bool, smallest: float, seed: int = 0
) -> Comparison:
    """Compare two configurations' per-seed values; `paired` when a[i] and b[i] share seed i."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if paired and x.shape != y.shape:
        raise ValueError(f"paired samples differ in size: {x.size} and {y.size}")
    if x.size < 2 or y.size < 2:
        raise ValueError("each side needs at least two values")
    effect, low, high, p = _t_test(x, y, paired)
    boot = _bootstrap(x, y, paired, seed) if min(x.size, y.size) >= BOOTSTRAP_MIN_SEEDS else None
    return Comparison(
        effect=effect,
        ci_low=low,
        ci_high=high,
        p_value=p,
        hedges_g=hedges_g(x, y, paired=paired),
        n_a=int(x.size),
        n_b=int(y.size),
        paired=paired,
        bootstrap_low=boot[0] if boot else None,
        bootstrap_high=boot[1] if boot else None,
        seeds_for_power=seeds_for_power(_spread(x, y, paired), smallest, paired=paired),
    )


def _t_test(x: np.ndarray, y: np.ndarray, paired: bool) -> tuple[float, float, float, float]:
    """(effect, interval low, interval high, two-sided p) from scipy's paired or Welch t-test."""
    effect = float(np.mean(x - y)) if paired else float(np.mean(x) - np.mean(y))
    if _spread(x, y, paired) == 0:  # no variation at all: the effect is exact, t is undefined
        return effect, effect, effect, 1.0 if effect == 0 else 0.0
    from scipy import stats

    result = stats.ttest_rel(x, y) if paired else stats.ttest_ind(x, y, equal_var=False)
    interval = result.confidence_interval(confidence_level=CONFIDENCE)
    return effect, float(interval.low), float(interval.high), float(result.pvalue)


def _bootstrap(x: np.ndarray, y: np.ndarray, paired: bool, seed: int) -> tuple[float, float] | None:
    rng = np.random.default_rng(seed)
    if paired:
        data: tuple[np.ndarray, ...] = (x - y,)

        def statistic(d: np.ndarray, axis: int) -> np.ndarray:
            return np.asarray(np.mean(d, axis=axis))
    else:
        data = (x, y)

        def statistic(a: np.ndarray, b: np.ndarray, axis: int) -> np.ndarray:  # type: ignore[misc]
            return np.asarray(np.mean(a, axis=axis) - np.mean(b, axis=axis))

    from scipy import stats

    result = stats.bootstrap(
        data, statistic, n_resamples=BOOTSTRAP_RESAMPLES, confidence_level=CONFIDENCE, method="BCa", rng=rng
    )
    low, high = float(result.confidence_interval.low), float(result.confidence_interval.high)
    return None if math.isnan(low) or math.isnan(high) else (low, high)


def _spread(x: np.ndarray, y: np.ndarray, paired: bool) -> float:
    """The standard deviation the test divides by: of the differences, or pooled over both sides."""
    if paired:
        return float(np.std(x - y, ddof=1))
    pooled = ((x.size - 1) * np.var(x, ddof=1) + (y.size - 1) * np.var(y, ddof=1)) / (x.size + y.size - 2)
    return float(math.sqrt(pooled))


def hedges_g(x: np.ndarray, y: np.ndarray, *, paired: bool) -> float | None:
    """Cohen's d with Hedges' small-sample correction J = 1 − 3 / (4·df − 1) (Hedges 1981; df = n − 1
    paired, n_a + n_b − 2 otherwise). Paired: d_z, the mean difference over the differences' sd."""
    spread = _spread(x, y, paired)
    if spread == 0:
        return None
    if paired:
        d, df = float(np.mean(x - y)) / spread, x.size - 1
    else:
        d, df = float(np.mean(x) - np.mean(y)) / spread, x.size + y.size - 2
    return (1 - 3 / (4 * df - 1)) * d


def seeds_for_power(
    spread: float, smallest: float, *, paired: bool, alpha: float = ALPHA, power: float = POWER
) -> int | None:
    """Seeds per configuration for a two-sided t-test to detect `smallest` with this power, given the
    spread seen: the smallest n whose noncentral-t power reaches it (None beyond MAX_SEEDS_SEARCHED)."""
    if smallest <= 0:
        raise ValueError("the smallest effect that counts must be positive")
    if spread == 0:
        return 2

    def enough(n: int) -> bool:
        return _power(n, smallest / spread, paired=paired, alpha=alpha) >= power

    # Power grows with n, so double until it is enough, then bisect: about 2·log2(n) evaluations of
    # the noncentral t instead of n (a report with a wide spread would otherwise search 10 000).
    high = 2
    while not enough(high):
        if high >= MAX_SEEDS_SEARCHED:
            return None
        high = min(2 * high, MAX_SEEDS_SEARCHED)
    low = high // 2  # not enough (or below 2)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if enough(middle) else (middle, high)
    return max(high, 2)


def _power(n: int, standardized: float, *, paired: bool, alpha: float) -> float:
    df = n - 1 if paired else 2 * n - 2
    noncentrality = standardized * math.sqrt(n if paired else n / 2)
    from scipy import stats

    critical = stats.t.ppf(1 - alpha / 2, df)
    return float(stats.nct.sf(critical, df, noncentrality) + stats.nct.cdf(-critical, df, noncentrality))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values (Holm 1979), in the order given: the i-th smallest of m is
    multiplied by m − i + 1, made monotone by a running maximum, and capped at 1."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted = [0.0] * len(p_values)
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[index]))
        adjusted[index] = running
    return adjusted


def judge(
    comparison: Comparison, *, direction: Literal[1, -1], smallest: float, adjusted_p: float
) -> Judgement:
    """The pre-declared rule of this module's docstring. `direction` +1: the claim says a > b."""
    effect = direction * comparison.effect
    upper = max(direction * comparison.ci_low, direction * comparison.ci_high)
    if adjusted_p < ALPHA and effect < 0:
        return Judgement("contradicted", None, adjusted_p)
    if adjusted_p < ALPHA and effect >= smallest:
        return Judgement("supported", None, adjusted_p)
    if (adjusted_p < ALPHA and effect < smallest) or upper < smallest:
        return Judgement("inconclusive", "effect below the smallest that counts", adjusted_p)
    return Judgement("inconclusive", "too few seeds", adjusted_p)


def failed(adjusted_p: float = 1.0) -> Judgement:
    """The judgement of a claim whose runs did not leave two results on each side."""
    return Judgement("inconclusive", "runs failed", adjusted_p)
