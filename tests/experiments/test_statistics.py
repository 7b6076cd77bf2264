"""The statistics module against scipy's own functions and hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from service.experiments.statistics import (
    compare,
    failed,
    hedges_g,
    holm,
    judge,
    seeds_for_power,
)

A = [0.881, 0.884, 0.879, 0.886, 0.882]
B = [0.861, 0.874, 0.858, 0.869, 0.866]


def test_welch_interval_and_p_value_are_scipys() -> None:
    result = compare(A, B, paired=False, smallest=0.005)
    welch = stats.ttest_ind(A, B, equal_var=False)
    interval = welch.confidence_interval(confidence_level=0.95)
    assert result.effect == pytest.approx(np.mean(A) - np.mean(B))
    assert result.p_value == pytest.approx(welch.pvalue)
    assert (result.ci_low, result.ci_high) == pytest.approx((interval.low, interval.high))
    assert result.bootstrap_low is None  # 5 seeds: below the bootstrap's minimum


def test_paired_interval_is_the_one_sample_interval_of_the_differences() -> None:
    result = compare(A, B, paired=True, smallest=0.005)
    differences = np.subtract(A, B)
    mean, sem = differences.mean(), differences.std(ddof=1) / math.sqrt(len(A))
    half = stats.t.ppf(0.975, len(A) - 1) * sem
    assert (result.ci_low, result.ci_high) == pytest.approx((mean - half, mean + half))
    assert result.p_value == pytest.approx(stats.ttest_rel(A, B).pvalue)


def test_hedges_g_by_hand() -> None:
    x, y = np.array([1.0, 2.0, 3.0]), np.array([2.0, 3.0, 4.0, 5.0])
    pooled = math.sqrt((2 * 1.0 + 3 * (5 / 3)) / 5)  # variances 1 and 5/3, df 2 and 3
    d = (2.0 - 3.5) / pooled
    assert hedges_g(x, y, paired=False) == pytest.approx(d * (1 - 3 / (4 * 5 - 1)))
    diffs = np.array([1.0, 2.0, 4.0])
    assert hedges_g(diffs, np.zeros(3), paired=True) == pytest.approx(
        diffs.mean() / diffs.std(ddof=1) * (1 - 3 / (4 * 2 - 1))
    )


def test_holm_orders_and_caps_by_hand() -> None:
    # sorted: 0.01·3 = 0.03, 0.03·2 = 0.06, 0.04·1 = 0.04 → running max 0.06; in the given order
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])
    assert holm([]) == []


def test_seeds_for_power_matches_the_textbook_values() -> None:
    # Two groups, d = 1: 17 per group (16.7 rounded up); paired d_z = 0.5: 34 pairs (33.4).
    assert seeds_for_power(1.0, 1.0, paired=False) == 17
    assert seeds_for_power(2.0, 1.0, paired=True) == 34
    assert seeds_for_power(0.0, 0.1, paired=False) == 2
    with pytest.raises(ValueError, match="positive"):
        seeds_for_power(1.0, 0.0, paired=False)


def test_a_known_effect_is_detected_and_supported() -> None:
    rng = np.random.default_rng(0)
    good, bad = 0.90 + rng.normal(0, 0.005, 10), 0.85 + rng.normal(0, 0.005, 10)
    result = compare(good.tolist(), bad.tolist(), paired=False, smallest=0.01)
    assert result.bootstrap_low is not None
    assert result.bootstrap_high is not None
    assert result.bootstrap_low < result.effect < result.bootstrap_high
    assert judge(result, direction=1, smallest=0.01, adjusted_p=result.p_value).verdict == "supported"
    assert judge(result, direction=-1, smallest=0.01, adjusted_p=result.p_value).verdict == "contradicted"


def test_a_null_effect_stays_inconclusive_and_says_how_many_seeds_would_decide() -> None:
    rng = np.random.default_rng(1)
    same = [(0.88 + rng.normal(0, 0.01, 3)).tolist() for _ in range(2)]
    result = compare(same[0], same[1], paired=False, smallest=0.01)
    judgement = judge(result, direction=1, smallest=0.01, adjusted_p=result.p_value)
    assert judgement.verdict == "inconclusive"
    assert judgement.reason == "too few seeds"
    assert result.seeds_for_power is not None
    assert result.seeds_for_power > 3


def test_a_significant_but_small_effect_is_below_the_smallest_that_counts() -> None:
    result = compare(
        [1.002, 1.0025, 1.0019, 1.0022], [1.0, 1.0003, 0.9998, 1.0001], paired=False, smallest=0.1
    )
    judgement = judge(result, direction=1, smallest=0.1, adjusted_p=result.p_value)
    assert (judgement.verdict, judgement.reason) == ("inconclusive", "effect below the smallest that counts")


def test_identical_sides_and_failed_runs() -> None:
    result = compare([0.5, 0.5], [0.5, 0.5], paired=True, smallest=0.01)
    assert (result.effect, result.p_value, result.hedges_g) == (0.0, 1.0, None)
    assert failed().reason == "runs failed"
    with pytest.raises(ValueError, match="at least two"):
        compare([0.5], [0.4, 0.6], paired=False, smallest=0.01)


@pytest.mark.parametrize(
    ("spread", "smallest", "paired"),
    [(1.0, 1.0, False), (2.0, 1.0, True), (0.3, 0.01, True), (5.0, 1.0, False), (1.0, 3.0, True)],
)
def test_the_power_search_finds_the_smallest_n_a_linear_search_finds(
    spread: float, smallest: float, paired: bool
) -> None:
    from service.experiments.statistics import _power

    found = seeds_for_power(spread, smallest, paired=paired)
    assert found is not None
    assert _power(found, smallest / spread, paired=paired, alpha=0.05) >= 0.8
    assert found == 2 or _power(found - 1, smallest / spread, paired=paired, alpha=0.05) < 0.8


def test_an_effect_too_small_for_ten_thousand_seeds_is_none_and_quick() -> None:
    import time

    started = time.perf_counter()
    assert seeds_for_power(1.0, 0.001, paired=True) is None
    assert time.perf_counter() - started < 1.0
