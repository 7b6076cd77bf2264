"""The matplotlib figures and the dashboard's charts draw a configuration alike: the same colour
(one palette, in grid order) and the same line styles (training solid, validation dashed)."""

from __future__ import annotations

import re
from pathlib import Path

from service.experiments import plots

WEB = Path(plots.__file__).resolve().parents[1] / "web"


def test_the_dashboard_and_the_figures_share_one_palette_and_line_styles() -> None:
    chart_js = (WEB / "chart.js").read_text()
    palette = re.search(r"const PALETTE = \[([^\]]*)\]", chart_js)
    assert palette is not None
    assert tuple(re.findall(r'"(#[0-9a-f]{6})"', palette.group(1))) == plots.PALETTE
    assert dict(plots.SPLIT_STYLES) == {"train": "-", "val": "--"}
    assert 'dash: split === "val"' in (WEB / "app.js").read_text()  # the dashboard dashes validation


def test_configurations_past_the_palette_differ_by_marker() -> None:
    styles = {(plots._color(i), plots._marker(i)) for i in range(3 * len(plots.PALETTE))}
    assert len(styles) == 3 * len(plots.PALETTE)
