"""A card's figure from bnlab's runs: on the left the paper's figure redrawn (curves per epoch, as the BN
paper's Fig. 1, or a metric against a grid value, as GN's error-vs-batch curves), on the right each
claim's effect with its 95 % interval, the smallest effect that counts, and the verdict.

matplotlib's object API only (see service.experiments.plots); every curve carries an SVG gid starting
with `curve-`, every claim's interval one starting with `claim-`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from service.cards.model import Card
from service.cards.verdicts import CardRun, ClaimResult, matches, metric_value
from service.experiments.grid import config_label, grid_points
from service.experiments.plots import ImageFormat, band, render

if TYPE_CHECKING:
    from matplotlib.axes import Axes

VERDICT_COLORS = {
    "supported": "tab:green",
    "contradicted": "tab:red",
    "inconclusive": "tab:gray",
    None: "tab:blue",
}


def _configs(card: Card) -> list[dict[str, Any]]:
    return [p for part in card.parts for p in grid_points(part)]


def _curves(ax: Axes, card: Card, runs: Sequence[CardRun]) -> None:
    column = card.figure.metric
    for i, point in enumerate(_configs(card)):
        done = [r for r in runs if r.point == point and r.status == "succeeded" and r.epochs]
        b = band([[float(getattr(e, column)) for e in r.epochs] for r in done])
        if b is None:
            continue
        x, mean, std = np.array(b.epochs), np.array(b.mean), np.array(b.std)
        ax.plot(
            x, mean, color=f"C{i % 10}", marker="o", markersize=3, label=config_label(point), gid=f"curve-{i}"
        )
        if std.any():
            ax.fill_between(x, mean - std, mean + std, color=f"C{i % 10}", alpha=0.18, linewidth=0)
    ax.set_xlabel("Epochs")
    ax.set_ylabel(column.replace("_", " "))


def _series_label(card: Card, point: dict[str, Any]) -> str:
    x, series = card.figure.x, card.figure.series
    if series == "config":
        return config_label({k: v for k, v in point.items() if k != x}) or "all"
    return config_label({series: point.get(series)}) if series else "all"


def _versus(ax: Axes, card: Card, runs: Sequence[CardRun]) -> None:
    spec = card.figure
    assert spec.x is not None
    lines: dict[str, list[tuple[Any, float, float]]] = {}
    for point in _configs(card):
        values = [
            metric_value(r, spec.metric) for r in runs if r.status == "succeeded" and matches(r.point, point)
        ]
        values = [1 - v if spec.error else v for v in values if math.isfinite(v)]
        if not values:
            continue
        sd = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        lines.setdefault(_series_label(card, point), []).append(
            (point.get(spec.x), float(np.mean(values)), sd)
        )
    numeric = all(isinstance(x, int | float) for pts in lines.values() for x, _, _ in pts)
    for i, (label, pts) in enumerate(lines.items()):
        xs = [p[0] for p in pts] if numeric else [str(p[0]) for p in pts]
        means, sds = [p[1] for p in pts], [p[2] for p in pts]
        ax.errorbar(xs, means, yerr=sds, fmt="none", capsize=3, color=f"C{i % 10}")
        ax.plot(xs, means, marker="o", color=f"C{i % 10}", label=label, gid=f"curve-{i}")
    if spec.log_x and numeric:
        from matplotlib.ticker import NullLocator

        ax.set_xscale("log")
        ticks = sorted({p[0] for pts in lines.values() for p in pts})
        ax.set_xticks(ticks, [format(t, "g") for t in ticks])
        ax.xaxis.set_minor_locator(NullLocator())  # only the grid's own values are labelled
    ax.set_xlabel(spec.x)
    name = spec.metric.split(".")[-1].replace("_", " ")
    ax.set_ylabel(("error (1 − " + name + ")") if spec.error else name)


def _claims(ax: Axes, results: Sequence[ClaimResult]) -> None:
    names = [r.contrast.name for r in results]
    for i, r in enumerate(results):
        y = len(results) - 1 - i
        cmp, verdict = r.comparison, r.judgement.verdict if r.judgement else None
        d = r.contrast.direction
        ax.plot([d * r.contrast.smallest], [y], marker="|", markersize=14, color="black")
        if cmp is None:
            ax.text(0, y, "runs failed", va="center", fontsize="small")
            continue
        low, high = sorted((d * cmp.ci_low, d * cmp.ci_high))
        ax.plot([low, high], [y, y], color=VERDICT_COLORS[verdict], linewidth=3, gid=f"claim-{i}")
        ax.plot([d * cmp.effect], [y], marker="o", color=VERDICT_COLORS[verdict])
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(results)), list(reversed(names)), fontsize="small")
    ax.set_xlabel("effect in the claimed direction (95 % CI; | = smallest that counts)")
    ax.set_title("Claims: green supported, red contradicted, grey inconclusive", fontsize="small")


def card_figure(
    card: Card, runs: Sequence[CardRun], results: Sequence[ClaimResult], fmt: ImageFormat
) -> bytes:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12.0, 5.0), dpi=100)
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    (_curves if card.figure.kind == "curves" else _versus)(left, card, runs)
    left.set_title(f"{card.name}: {card.figure.title}", fontsize="medium")
    left.grid(alpha=0.3)
    if left.get_legend_handles_labels()[0]:
        left.legend(fontsize="x-small")
    _claims(right, results)
    right.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    return render(fig, fmt)
