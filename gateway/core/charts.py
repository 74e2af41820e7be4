"""SVG charts drawn by pygal, for the console, the benchmark and the HTML reports.

Each chart is one self-contained SVG string: its styles inline, no script and nothing fetched
from the network, so it works offline and inside an ``<img>`` or an HTML report alike.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping, Sequence

import pygal
from pygal.style import Style

# pygal appends a legacy import hook for its map plug-ins (unused here); left in place, it turns
# every later failed optional import in the process into an ImportWarning.
sys.meta_path[:] = [f for f in sys.meta_path if type(f).__name__ != "PluginImportFixer"]

_STYLE_ARGS: dict[str, object] = {
    "background": "white",
    "plot_background": "white",
    "foreground": "#1d2430",
    "foreground_strong": "#1d2430",
    "foreground_subtle": "#d0d5dd",
    "font_family": "system-ui, sans-serif",
    "colors": ("#155eef", "#067647", "#b42318", "#dc6803", "#7a5af8", "#0e9384", "#c11574", "#667085"),
    "title_font_size": 14,
    "legend_font_size": 11,
    "label_font_size": 10,
    "major_label_font_size": 10,
}
_STYLE = Style(**_STYLE_ARGS)
PASS, FAIL, WARN, MUTED = "#067647", "#b42318", "#dc6803", "#98a2b3"  # colours that carry a verdict
# pygal adds a script that sets its tooltip options (without its js file it does nothing) and
# comments with its web addresses: both go, so that the SVG names nothing to fetch.
_SCRIPT = re.compile(r"<script\b.*?</script>|<!--.*?-->", re.DOTALL)


def _options(
    title: str, width: int, height: int, y_title: str, colors: Sequence[str] = ()
) -> dict[str, object]:
    return {
        "title": title,
        "y_title": y_title or None,
        "width": width,
        "height": height,
        "explicit_size": True,
        "style": Style(**{**_STYLE_ARGS, "colors": tuple(colors)}) if colors else _STYLE,
        "js": [],
        "disable_xml_declaration": True,
        "legend_at_bottom": True,
        "legend_at_bottom_columns": 2,
        "truncate_legend": -1,
        "no_data_text": "no data yet",
        "print_values": False,
    }


def _render(chart: pygal.graph.graph.Graph) -> str:
    svg: str = chart.render(is_unicode=True)
    return _SCRIPT.sub("", svg)


def line_chart(
    title: str,
    x_labels: Sequence[str],
    series: Mapping[str, Sequence[float | None]],
    *,
    y_title: str = "",
    width: int = 640,
    height: int = 300,
) -> str:
    """One line per series over shared x labels (None leaves a gap)."""
    chart = pygal.Line(
        **_options(title, width, height, y_title),
        show_dots=len(x_labels) <= 30,
        dots_size=2,
        x_labels_major_count=6,
        show_minor_x_labels=False,
        include_x_axis=True,
        allow_interruptions=True,
    )
    chart.x_labels = list(x_labels)
    for name, values in series.items():
        chart.add(name, list(values))
    return _render(chart)


def bar_chart(
    title: str,
    labels: Sequence[str],
    series: Mapping[str, Sequence[float | None]],
    *,
    y_title: str = "",
    horizontal: bool = False,
    width: int = 640,
    height: int = 300,
    stacked: bool = False,
    value_range: tuple[float, float] | None = None,
    colors: Sequence[str] = (),
) -> str:
    """Bars per label, one colour per series; ``value_range`` fixes the value axis (e.g. 0-100 %)."""
    kind = (
        (pygal.StackedBar if not horizontal else pygal.HorizontalStackedBar)
        if stacked
        else (pygal.HorizontalBar if horizontal else pygal.Bar)
    )
    extra = {"range": value_range} if value_range is not None else {}
    chart = kind(**_options(title, width, height, y_title, colors), x_label_rotation=0, **extra)
    chart.x_labels = list(labels)
    for name, values in series.items():
        chart.add(name, list(values))
    return _render(chart)


def side_by_side(charts: Sequence[str], *, gap: int = 16) -> str:
    """Several charts in one SVG, left to right (each keeps its own styles: their ids differ)."""
    sizes = [
        (int(m.group(1)), int(m.group(2)))
        for m in (re.search(r'width="(\d+)" height="(\d+)"', c) for c in charts)
        if m is not None
    ]
    if len(sizes) != len(charts):
        raise ValueError("each chart needs its width and height")
    x = 0
    parts = []
    for chart, (width, _height) in zip(charts, sizes, strict=True):
        parts.append(chart.replace("<svg ", f'<svg x="{x}" y="0" ', 1))
        x += width + gap
    total = x - gap if charts else 0
    height = max((h for _, h in sizes), default=0)
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{total}" height="{height}"'
        f' viewBox="0 0 {total} {height}">{"".join(parts)}</svg>'
    )
