"""A card's verdicts from hand-made runs: per-seed contrasts, dropped seeds, the paired test, Holm
across the card's claims, the fixed rule, and the sentences comparing with the paper."""

from __future__ import annotations

import math

import pytest
from scipy import stats

from service.cards.model import Card, Contrast, FigureSpec, Sizes
from service.cards.verdicts import (
    CardRun,
    SlotStat,
    judge_card,
    metric_value,
    paper_comparison,
    summary,
)
from service.experiments import statistics
from service.experiments.report import EpochRow as Epoch
from service.experiments.report import Term

NORM = "model.norm.kind"


def card(*contrasts: Contrast) -> Card:
    return Card(
        name="hand",
        title="t",
        citation="c",
        claim="c",
        paper_setup="s",
        paper_figures=(),
        setup="s",
        differences="d",
        base={},
        parts=({NORM: ["none", "batch"], "train.lr": [0.01, 0.3]},),
        datasets=("synthetic",),
        sizes={"quick": Sizes(epochs=1, seeds=(0, 1), limit=100)},
        contrasts=contrasts,
        figure=FigureSpec(kind="curves", metric="val_accuracy", title="t"),
    )


def contrast(
    name: str, lr: float, *, smallest: float = 0.01, direction: int = 1, paper: float | None = None
) -> Contrast:
    return Contrast(
        name=name,
        sentence=name,
        metric="final.val_accuracy",
        terms=(Term({NORM: "batch", "train.lr": lr}, 1.0), Term({NORM: "none", "train.lr": lr}, -1.0)),
        direction=1 if direction > 0 else -1,
        smallest=smallest,
        words="batch − none",
        paper_effect=paper,
        paper_effect_source="the paper",
    )


def run(norm: str, lr: float, seed: int, acc: float, status: str = "succeeded") -> CardRun:
    return CardRun(
        point={NORM: norm, "train.lr": lr},
        seed=seed,
        status=status,
        epochs=[Epoch(1, acc - 0.1, 1.0, acc - 0.1, 1.0), Epoch(2, acc, 0.5, acc, 0.4)],
    )


BATCH = {0.01: [0.90, 0.91, 0.92, 0.90, 0.93], 0.3: [0.85, 0.86, 0.84, 0.87, 0.85]}
NONE = {0.01: [0.80, 0.82, 0.79, 0.81, 0.80], 0.3: [0.84, 0.86, 0.85, 0.86, 0.84]}


def runs() -> list[CardRun]:
    return [
        run(norm, lr, seed, table[lr][seed])
        for norm, table in (("batch", BATCH), ("none", NONE))
        for lr in (0.01, 0.3)
        for seed in range(5)
    ]


def test_each_claim_is_a_paired_test_of_the_per_seed_contrast_with_holm_across_claims() -> None:
    big, small = contrast("big", 0.01), contrast("small", 0.3)
    results = judge_card(card(big, small), runs(), finished=True)

    raw = []
    for result, lr in zip(results, (0.01, 0.3), strict=True):
        diffs = [b - n for b, n in zip(BATCH[lr], NONE[lr], strict=True)]
        assert list(result.per_seed.values()) == pytest.approx(diffs)
        test = stats.ttest_1samp(diffs, 0.0)
        assert result.comparison is not None
        assert result.comparison.p_value == pytest.approx(test.pvalue)
        assert result.comparison.effect == pytest.approx(sum(diffs) / 5)
        ci = test.confidence_interval(0.95)
        assert (result.comparison.ci_low, result.comparison.ci_high) == pytest.approx((ci.low, ci.high))
        raw.append(test.pvalue)
    adjusted = statistics.holm(raw)
    assert [r.judgement.adjusted_p for r in results if r.judgement] == pytest.approx(adjusted)
    low, high = sorted(raw)  # Holm by hand for two claims: 2·p₍₁₎, then max(2·p₍₁₎, p₍₂₎)
    assert sorted(adjusted) == pytest.approx([min(1.0, 2 * low), min(1.0, max(2 * low, high))])
    assert results[0].judgement is not None
    assert results[0].judgement.verdict == "supported"
    assert results[1].judgement is not None
    assert results[1].judgement.verdict == "inconclusive"


def test_a_failed_run_drops_its_seed_and_two_failures_leave_the_claim_failed() -> None:
    rows = runs()
    rows[0] = run("batch", 0.01, 0, 0.9, status="failed")
    (result,) = judge_card(card(contrast("big", 0.01)), rows, finished=True)
    assert result.dropped == [0]
    assert sorted(result.per_seed) == [1, 2, 3, 4]

    rows = [r for r in runs() if not (r.point[NORM] == "batch" and r.seed > 0)]
    (result,) = judge_card(card(contrast("big", 0.01)), rows, finished=True)
    assert result.comparison is None
    assert result.judgement == statistics.failed()


def test_a_diverged_run_drops_its_seed_like_a_failed_one() -> None:
    """What the worker leaves of a run whose loss became NaN: failed, its last epoch's losses null in the
    database (NaN here), its accuracy a number; the seed is dropped, not averaged as that number."""
    rows = runs()
    rows[11] = CardRun(
        point={NORM: "none", "train.lr": 0.01},
        seed=1,
        status="failed",
        epochs=[Epoch(1, 0.7, 0.9, 0.7, 0.9), Epoch.stored(2, 0.1, None, 0.1, None)],
        slots=[SlotStat(0, "bn1", 0.0, 1.0), SlotStat.stored(2, "bn1", None, None)],
    )
    assert (rows[11].seed, rows[11].point) == (runs()[11].seed, runs()[11].point)  # the run it replaces
    assert math.isnan(rows[11].slots[1].input_mean)
    (result,) = judge_card(card(contrast("big", 0.01)), rows, finished=True)
    assert result.dropped == [1]
    assert sorted(result.per_seed) == [0, 2, 3, 4]


def test_unfinished_runs_leave_verdicts_pending() -> None:
    (result,) = judge_card(card(contrast("big", 0.01)), runs(), finished=False)
    assert result.judgement is None
    assert result.comparison is not None


def test_a_claim_pointing_the_other_way_is_contradicted() -> None:
    (result,) = judge_card(card(contrast("wrong", 0.01, direction=-1)), runs(), finished=True)
    assert result.judgement is not None
    assert result.judgement.verdict == "contradicted"


def test_metrics_final_best_mean_and_the_slot_shift() -> None:
    r = run("batch", 0.01, 0, 0.9)
    assert metric_value(r, "final.val_accuracy") == 0.9
    assert metric_value(r, "best.val_loss") == 0.5
    assert metric_value(r, "mean.val_accuracy") == pytest.approx(0.85)
    shifted = CardRun(
        point={},
        seed=0,
        status="succeeded",
        slots=[
            SlotStat(0, "bn1", 0.0, 1.0),
            SlotStat(3, "bn1", 0.5, 2.0),
            SlotStat(0, "bn2", 1.0, 2.0),
            SlotStat(3, "bn2", 1.0, 2.0),
        ],
    )
    assert metric_value(shifted, "shift.slot_inputs") == pytest.approx((0.5 + math.log(2)) / 2)
    assert math.isnan(metric_value(CardRun(point={}, seed=0, status="succeeded"), "final.val_accuracy"))


def test_the_paper_comparison_says_direction_and_order_of_magnitude() -> None:
    c = contrast("c", 0.01, paper=0.1)
    same = statistics.compare([0.05, 0.06, 0.04], [0, 0, 0], paired=True, smallest=0.01)
    assert "Same direction as the paper and the same order of magnitude" in paper_comparison(c, same)
    tiny = statistics.compare([0.005, 0.006, 0.004], [0, 0, 0], paired=True, smallest=0.01)
    assert "over ten times smaller" in paper_comparison(c, tiny)
    against = statistics.compare([-0.05, -0.06, -0.04], [0, 0, 0], paired=True, smallest=0.01)
    assert "against the paper's direction" in paper_comparison(c, against)
    assert "no verified number" in paper_comparison(contrast("d", 0.01), same)
    results = judge_card(card(contrast("big", 0.01, paper=0.1)), runs(), finished=True)
    sentence = summary(card(contrast("big", 0.01, paper=0.1)), results, finished=True)
    assert sentence.startswith("Of 1 claims, supported: big")
    assert "paper's verified figure" in sentence


def test_probe_metrics_read_the_epoch_end_probes() -> None:
    from service.cards.verdicts import ProbeRow

    percentiles = [
        ProbeRow("percentiles", epoch, layer, q, value)
        for layer, scale in (("bn1", 5.0), ("bn3", 1.0))
        for epoch, shift in ((0, 0.0), (1, 0.1), (2, 0.4))
        for q, value in (("p15", -scale + shift), ("p50", shift), ("p85", scale + shift))
    ]
    gradients = [
        ProbeRow("gradients", 0, "model", "log_slope", -0.3),
        ProbeRow("gradients", 1, "model", "log_slope", 0.2),
    ]
    gaps = [ProbeRow("statistics_gap", 2, layer, "mean_gap", v) for layer, v in (("bn1", 0.1), ("bn2", 0.3))]
    gaps.append(ProbeRow("statistics_gap", 1, "bn1", "mean_gap", 9.0))
    r = CardRun(point={}, seed=0, status="succeeded", probes=[*percentiles, *gradients, *gaps])
    # The last slot (bn3): every percentile moved 0.4 over an initial 15-85 spread of 2.
    assert metric_value(r, "probe.sigmoid_input_drift") == pytest.approx(0.2)
    assert metric_value(r, "probe.gradient_log_slope") == pytest.approx(-0.3)  # at initialisation
    assert metric_value(r, "probe.ema_gap") == pytest.approx(0.2)  # the last epoch, over layers
    assert math.isnan(metric_value(r, "probe.gradient_predictiveness"))  # not recorded
