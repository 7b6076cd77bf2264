"""Figures of the epoch-end probes (docs/probes.md), for GET /api/v1/runs/{id}/plot.png?metric=<probe>.

Layers run along the x axis in network order (depth 1 = the input layer) with one line per probed
epoch (epoch 0, the initial network, solid black), or, for the whole-network values, epochs along x.
Deep networks have many layers and many epochs: at most MAX_EPOCH_LINES epochs are drawn (the first,
the last, evenly spaced ones between) and at most MAX_LAYER_LINES layers where layers are lines.
Every data line has an SVG id (gid) starting with `curve-`, as in service/experiments/plots.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from service.ml.probes import MODEL

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

MAX_EPOCH_LINES = 6
MAX_LAYER_LINES = 8
# {epoch: {layer: {name: value}}}, layers in network order (as the probe route orders them).
ProbeData = dict[int, dict[str, dict[str, float | None]]]


def _figure(rows: int) -> tuple[Figure, list[Axes]]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.0, 3.4 * rows + 0.6), dpi=100)
    return fig, [fig.add_subplot(rows, 1, i + 1) for i in range(rows)]


def _spread(items: Sequence[int], most: int) -> list[int]:
    """At most `most` of `items`, the first and last included, evenly spaced."""
    if len(items) <= most:
        return list(items)
    picks = {round(i * (len(items) - 1) / (most - 1)) for i in range(most)}
    return [items[i] for i in sorted(picks)]


def _epoch_style(epoch: int, i: int) -> dict[str, Any]:
    return {"color": "black" if epoch == 0 else f"C{i % 10}", "linewidth": 2.0 if epoch == 0 else 1.2}


def _layers(data: ProbeData) -> list[str]:
    seen: dict[str, None] = {}
    for layers in data.values():
        for layer in layers:
            if layer != MODEL:
                seen.setdefault(layer)
    return list(seen)


def _per_layer(ax: Axes, data: ProbeData, name: str, *, gid: str, log: bool = False) -> None:
    """One line per (sampled) epoch: `name` against the layer's position in the network."""
    layers = _layers(data)
    for i, epoch in enumerate(_spread(sorted(data), MAX_EPOCH_LINES)):
        points = [
            (x, v)
            for x, layer in enumerate(layers, start=1)
            if (v := data[epoch].get(layer, {}).get(name)) is not None and (v > 0 or not log)
        ]
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(
                xs,
                ys,
                marker=".",
                label=f"epoch {epoch}",
                gid=f"curve-{gid}-{epoch}",
                **_epoch_style(epoch, i),
            )
    if log:
        ax.set_yscale("log")
    _label_layers(ax, layers)
    ax.set_ylabel(name)
    ax.grid(alpha=0.3)


def _label_layers(ax: Axes, layers: list[str]) -> None:
    if len(layers) <= 16:
        ax.set_xticks(range(1, len(layers) + 1), layers, rotation=45, fontsize="x-small")
    ax.set_xlabel("layer (1 = input side)")


def _model_series(data: ProbeData, name: str) -> tuple[list[int], list[float]]:
    points = [(e, v) for e in sorted(data) if (v := data[e].get(MODEL, {}).get(name)) is not None]
    return [e for e, _ in points], [v for _, v in points]


def gradients_figure(data: ProbeData, *, title: str) -> Figure:
    """‖∂L/∂W_l‖ per layer (log scale) with the fitted log-linear growth of each drawn epoch (dashed;
    over the hidden layers when there are at least four), and ‖W_l‖ per layer."""
    fig, (top, bottom) = _figure(2)
    _per_layer(top, data, "grad_norm", gid="grad", log=True)
    for i, epoch in enumerate(_spread(sorted(data), MAX_EPOCH_LINES)):
        # As the probe fits: by position l, the first and last layers left out from four layers on,
        # norms that underflowed to 0 left out (a vanishing plain network's first layers).
        norms = [values.get("grad_norm") for layer, values in data[epoch].items() if layer != MODEL]
        count = len(norms)
        kept = [
            (float(x), math.log(v))
            for x, v in enumerate(norms, start=1)
            if v is not None and v > 0 and (count < 4 or 1 < x < count)
        ]
        fx = np.array([x for x, _ in kept])
        fy = np.array([y for _, y in kept])
        if len(fx) >= 2 and np.all(np.isfinite(fy)):
            slope, intercept = np.polyfit(fx, fy, 1)
            growth = math.exp(-slope)
            color = _epoch_style(epoch, i)["color"]
            label = f"fit, epoch {epoch}: ×{growth:.3g} per layer"
            fit = np.exp(intercept + slope * fx)
            top.plot(fx, fit, linestyle="--", color=color, label=label, gid=f"curve-fit-{epoch}")
    top.set_title(title)
    top.set_ylabel("‖∂L/∂W‖ (probe batch, train mode)")
    top.legend(fontsize="x-small")
    _per_layer(bottom, data, "weight_norm", gid="weight", log=True)
    bottom.set_ylabel("‖W‖")
    fig.tight_layout()
    return fig


def smoothness_figure(data: ProbeData, *, title: str) -> Figure:
    """Santurkar et al.'s Fig. 4 over epochs: the loss range along the gradient, the largest gradient
    change, and the effective β-smoothness."""
    fig, (top, middle, bottom) = _figure(3)
    epochs, low = _model_series(data, "loss_min")
    _, high = _model_series(data, "loss_max")
    if epochs and len(low) == len(high):
        top.fill_between(epochs, low, high, alpha=0.3, color="C0", gid="band-loss")
        top.plot(epochs, low, color="C0", gid="curve-loss-min")
        top.plot(epochs, high, color="C0", gid="curve-loss-max")
    top.set_ylabel("loss range")
    top.set_title(title)
    for ax, name, label in (
        (middle, "grad_change_max", "max ‖∇L(w−ηg) − ∇L(w)‖"),
        (bottom, "beta", "effective β"),
    ):
        xs, ys = _model_series(data, name)
        ax.plot(xs, ys, marker="o", markersize=3, color="C1", gid=f"curve-{name}")
        ax.set_ylabel(label, fontsize="small")
        if ys and min(ys) > 0:
            ax.set_yscale("log")
    for ax in (top, middle, bottom):
        ax.grid(alpha=0.3)
    bottom.set_xlabel("Epochs (0 = initial network)")
    fig.tight_layout()
    return fig


def percentiles_figure(data: ProbeData, *, title: str) -> Figure:
    """The BN paper's Fig. 1(b, c): per slot, the median of its input over epochs and the 15th–85th
    percentile band (at most MAX_LAYER_LINES slots, spread over the depth)."""
    fig, (ax,) = _figure(1)
    layers = _layers(data)
    for i, layer in enumerate(_spread_names(layers)):
        epochs = [e for e in sorted(data) if layer in data[e]]
        raw = {q: [data[e][layer].get(q) for e in epochs] for q in ("p15", "p50", "p85")}
        if not epochs or any(v is None for values in raw.values() for v in values):
            continue
        series = {q: [float(v or 0.0) for v in values] for q, values in raw.items()}
        color = f"C{i % 10}"
        ax.fill_between(epochs, series["p15"], series["p85"], color=color, alpha=0.15, gid=f"band-{layer}")
        ax.plot(
            epochs, series["p50"], color=color, marker="o", markersize=3, label=layer, gid=f"curve-{layer}"
        )
    ax.set_title(title)
    ax.set_xlabel("Epochs (0 = initial network)")
    ax.set_ylabel("slot input: median, 15th–85th percentiles")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="x-small")
    fig.tight_layout()
    return fig


def _spread_names(layers: list[str]) -> list[str]:
    return [layers[i] for i in _spread(list(range(len(layers))), MAX_LAYER_LINES)]


def gamma_figure(data: ProbeData, *, title: str) -> Figure:
    """Per norm layer: the fraction of γ near zero and the mean |γ|, one line per drawn epoch."""
    fig, (top, bottom) = _figure(2)
    _per_layer(top, data, "near_zero_fraction", gid="near-zero")
    top.set_ylabel("fraction |γ| < 0.01")
    top.set_title(title)
    top.legend(fontsize="x-small")
    _per_layer(bottom, data, "abs_mean", gid="abs-mean")
    bottom.set_ylabel("mean |γ|")
    fig.tight_layout()
    return fig


def statistics_gap_figure(data: ProbeData, *, title: str) -> Figure:
    """Per BN layer: the running statistics' error against the exact ones (mean in units of the std,
    variance relative), and over epochs the probe batch's accuracy in train mode and in eval mode."""
    fig, (top, middle, bottom) = _figure(3)
    _per_layer(top, data, "mean_gap", gid="mean-gap")
    top.set_ylabel("|m − μ| / σ", fontsize="small")
    top.set_title(title)
    top.legend(fontsize="x-small")
    _per_layer(middle, data, "var_gap", gid="var-gap")
    middle.set_ylabel("|v − σ²| / σ²", fontsize="small")
    for mode, color in (("train", "C0"), ("eval", "C1")):
        xs, ys = _model_series(data, f"{mode}_accuracy")
        bottom.plot(
            xs, ys, marker="o", markersize=3, color=color, label=f"{mode} mode", gid=f"curve-{mode}-accuracy"
        )
    bottom.set_ylabel("probe batch accuracy", fontsize="small")
    bottom.set_xlabel("Epochs (0 = initial network)")
    bottom.grid(alpha=0.3)
    bottom.legend(fontsize="x-small")
    fig.tight_layout()
    return fig


FIGURES: dict[str, Callable[..., Figure]] = {
    "gradients": gradients_figure,
    "smoothness": smoothness_figure,
    "percentiles": percentiles_figure,
    "gamma": gamma_figure,
    "statistics_gap": statistics_gap_figure,
}
