"""A search's Optuna plots (optimisation history, parallel coordinates, slice) as PNG or SVG.

Optuna draws them with pyplot, which keeps global state: one figure at a time (a lock), on the Agg
backend (no display), closed once rendered.
"""

from __future__ import annotations

import threading
import warnings
from typing import Any, Literal

import optuna

from service.experiments.plots import ImageFormat, render

PlotKind = Literal["history", "parallel", "slice"]
_PYPLOT = threading.Lock()


def search_plot(study: optuna.Study, kind: PlotKind, fmt: ImageFormat) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot
    from optuna.visualization import matplotlib as optuna_plots

    draw: dict[str, Any] = {
        "history": optuna_plots.plot_optimization_history,
        "parallel": optuna_plots.plot_parallel_coordinate,
        "slice": optuna_plots.plot_slice,
    }
    with _PYPLOT, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
        axes = draw[kind](study)
        first = axes.flat[0] if hasattr(axes, "flat") else axes
        figure = first.figure
        figure.set_size_inches(10, 5.5)
        try:
            return render(figure, fmt)
        finally:
            pyplot.close(figure)
