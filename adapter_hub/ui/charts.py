"""Plotly figure specs (plain JSON) for the compare page: a bar chart per metric, the best bar marked, and a
line chart over steps for a metric logged with steps. The browser draws them with plotly.js, served from the
installed plotly package (no network needed)."""

from __future__ import annotations

import html
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from ..registry import MetricRecord, MetricTable

BAR = "#9bb7d4"
BEST = "#2a9d3a"


def _text(value: str) -> str:
    """Plotly reads trace names, titles and tick labels as a small HTML subset; the entities make it show
    stored text literally (``<b>`` stays the four characters, not bold)."""
    return html.escape(value, quote=False)


def metric_label(name: str, split: str | None) -> str:
    return name if not split or name.startswith(f"{split}/") else f"{name} [{split}]"


def _layout(title: str, **extra: Any) -> dict[str, Any]:
    return {
        "title": {"text": _text(title), "font": {"size": 14}},
        "margin": {"l": 50, "r": 20, "t": 40, "b": 70},
        "height": 300,
        "paper_bgcolor": "rgba(0,0,0,0)",
        **extra,
    }


def bar_charts(table: MetricTable) -> list[dict[str, Any]]:
    """One bar chart per (metric, split) row of TABLE: a bar per version that has a value; the best in green."""
    figures = []
    for name, split in table.rows:
        key = table.key(name, split)
        refs = [r for r in table.refs if r in table.values[key]]
        best = table.best.get(key)
        trace = {
            "type": "bar",
            "x": [_text(r) for r in refs],
            "y": [table.values[key][r] for r in refs],
            "marker": {"color": [BEST if r == best else BAR for r in refs]},
            "text": [f"{table.values[key][r]:.4g}" + (" ★" if r == best else "") for r in refs],
            "textposition": "auto",
            "hovertemplate": "%{x}: %{y}<extra></extra>",
        }
        figures.append({"data": [trace], "layout": _layout(metric_label(name, split), showlegend=False)})
    return figures


def step_charts(records: Sequence[MetricRecord], refs: Sequence[str]) -> list[dict[str, Any]]:
    """One line chart per (metric, split) that some version logged with steps: a line per version."""
    series: dict[tuple[str, str | None], dict[str, list[tuple[int, int, float]]]] = defaultdict(dict)
    for order, m in enumerate(records):
        if m.step is not None:
            series[m.name, m.split].setdefault(m.ref, []).append((m.step, order, m.value))
    figures = []
    for (name, split), per_ref in sorted(series.items(), key=lambda item: (item[0][0], item[0][1] or "")):
        data = []
        for ref in refs:
            points = sorted(per_ref.get(ref, []))
            if points:
                data.append({
                    "type": "scatter", "mode": "lines+markers", "name": _text(ref),
                    "x": [p[0] for p in points], "y": [p[2] for p in points],
                })  # fmt: skip
        layout = _layout(f"{metric_label(name, split)} over steps", xaxis={"title": {"text": "step"}},
                         legend={"orientation": "h", "y": -0.3})  # fmt: skip
        figures.append({"data": data, "layout": layout})
    return figures
