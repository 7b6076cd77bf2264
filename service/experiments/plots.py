"""Plots as PNG or SVG bytes, drawn with matplotlib's object API (Figure + FigureCanvasAgg).

No pyplot: it keeps global figure state and picks a GUI backend; a Figure of its own is safe to
draw in any request thread and needs no display. matplotlib is imported on first use, so the API
and workers do not pay its import time unless a plot is asked for.

Every data line carries an SVG id (`gid`) starting with `curve-`, every band one starting with
`band-`, so a caller (or a test) can find them in the SVG.

The same conventions as the dashboard's charts (service/web/chart.js): configuration i has colour
PALETTE[i % 10] (matplotlib's tab10, in grid order) and, past the tenth, another marker; training
is solid and validation dashed.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

ImageFormat = Literal["png", "svg"]
CONTENT_TYPES: dict[str, str] = {"png": "image/png", "svg": "image/svg+xml"}
SIZE_INCHES = (8.0, 5.0)
DPI = 100


@dataclass(frozen=True)
class Band:
    """A curve over epochs: mean per epoch and the ±std band around it (std 0 where n < 2)."""

    epochs: list[int]
    mean: list[float]
    std: list[float]


def band(series: Sequence[Sequence[float]]) -> Band | None:
    """Mean and sample std over seeds, per epoch, over the seeds that reached that epoch."""
    length = max((len(s) for s in series), default=0)
    if length == 0:
        return None
    means, stds = [], []
    for i in range(length):
        values = np.array([s[i] for s in series if len(s) > i], dtype=float)
        means.append(float(values.mean()))
        stds.append(float(values.std(ddof=1)) if len(values) > 1 else 0.0)
    return Band(epochs=list(range(1, length + 1)), mean=means, std=stds)


def _new_figure(rows: int = 1) -> tuple[Figure, list[Axes]]:
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(SIZE_INCHES[0], SIZE_INCHES[1] * (1 if rows == 1 else 0.75 * rows)), dpi=DPI)
    axes = [fig.add_subplot(rows, 1, i + 1) for i in range(rows)]
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    return fig, axes


def _draw(ax: Axes, b: Band, *, label: str, color: str, style: str, marker: str, gid: str) -> None:
    x, mean, std = np.array(b.epochs), np.array(b.mean), np.array(b.std)
    ax.plot(
        x, mean, linestyle=style, color=color, marker=marker, markersize=3, label=label, gid=f"curve-{gid}"
    )
    if std.any():
        ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.18, linewidth=0, gid=f"band-{gid}")


# matplotlib's tab10, as hex: the dashboard's PALETTE is the same list.
PALETTE = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
    "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
)  # fmt: skip
MARKERS = ("o", "s", "^", "D", "v")
SPLIT_STYLES = (("train", "-"), ("val", "--"))  # training solid, validation dashed


def _color(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def _marker(i: int) -> str:
    """Configurations past the palette's length differ by their marker too."""
    return MARKERS[(i // len(PALETTE)) % len(MARKERS)]


def curves_figure(
    curves: Sequence[tuple[str, dict[str, Band]]], *, metric: Literal["loss", "accuracy"], title: str
) -> Figure:
    """Train (solid) and validation (dashed) `metric` per configuration: mean line, ±std band."""
    fig, (ax,) = _new_figure()
    for i, (label, bands) in enumerate(curves):
        for split, style in SPLIT_STYLES:
            b = bands.get(f"{split}_{metric}")
            if b is not None:
                name = "Training" if split == "train" else "Validation"
                _draw(
                    ax,
                    b,
                    label=f"{name} {metric} — {label}",
                    color=_color(i),
                    style=style,
                    marker=_marker(i),
                    gid=f"{split}-{i}",
                )
    ax.set_title(title)
    ax.set_xlabel("Epochs")
    ax.set_ylabel("Loss" if metric == "loss" else "Accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def activations_figure(layers: Sequence[tuple[str, Band]], *, title: str) -> Figure:
    """Per normalisation slot: the input's mean (top) and std (bottom) on the probe batch over epochs;
    `Band.mean` holds the means and `Band.std` the stds of one layer (epoch 0: the initial network)."""
    fig, (top, bottom) = _new_figure(rows=2)
    for i, (layer, b) in enumerate(layers):
        x = np.array(b.epochs)
        top.plot(
            x, b.mean, color=_color(i), marker=_marker(i), markersize=3, label=layer, gid=f"curve-mean-{i}"
        )
        bottom.plot(
            x, b.std, color=_color(i), marker=_marker(i), markersize=3, label=layer, gid=f"curve-std-{i}"
        )
    top.set_title(title)
    top.set_ylabel("input mean")
    bottom.set_ylabel("input std")
    bottom.set_xlabel("Epochs (0 = initial network)")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def render(fig: Figure, fmt: ImageFormat) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)  # attaches itself to the figure: no pyplot, no global backend
    buffer = io.BytesIO()
    # No creation date in the metadata: the same data give the same bytes.
    metadata = {"Date": None} if fmt == "svg" else {"Software": None}
    fig.savefig(buffer, format=fmt, metadata=metadata)
    return buffer.getvalue()
