"""Line charts as inline SVG, drawn here: no script, no library, nothing fetched; a browser or any SVG viewer shows
them as they are in the HTML."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from html import escape

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f")
"""Line colours, in order (matplotlib's tab10 without its yellow)."""
DASHES = ("", "7 3", "2 3", "9 3 2 3", "4 4")
"""Stroke dash patterns (SVG ``stroke-dasharray``) that tell apart the lines of one colour."""


@dataclass
class Line:
    """One series of a chart: (x, y) points joined by a line (and dotted, for sparse series like evaluations)."""

    label: str
    points: list[tuple[float, float]]
    color: str
    dash: str = ""
    dots: bool = False


@dataclass
class Mark:
    """A vertical line across the chart at ``x`` with a label (a stage boundary)."""

    x: float
    label: str
    color: str = "#888888"


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round values (1, 2 or 5 times a power of ten apart), as near ``count`` of them as such steps allow, inside
    ``lo``..``hi``."""
    span = hi - lo
    power = 10 ** math.floor(math.log10(span / max(1, count)))
    step = min((m * power for m in (1, 2, 5, 10)), key=lambda s: abs(span / s - count))
    first = math.floor(lo / step) * step
    ticks = []
    value = first
    while value <= hi + step * 1e-9:
        if value >= lo - step * 1e-9:
            ticks.append(round(value, 12))
        value += step
    return ticks


def _fmt(value: float) -> str:
    return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.2e}"


def _dash(pattern: str) -> str:
    return f' stroke-dasharray="{pattern}"' if pattern else ""


def _bounds(values: list[float]) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    if hi - lo < 1e-12 * max(1.0, abs(hi)):
        pad = abs(hi) * 0.1 or 1.0
        return lo - pad, hi + pad
    pad = (hi - lo) * 0.05
    return lo - pad, hi + pad


def line_chart(title: str, lines: list[Line], marks: list[Mark] = (), width: int = 540, height: int = 250) -> str:
    """A chart as an HTML ``<figure>``: the title, the SVG (axes with round ticks, one polyline per line, the
    vertical marks) and an HTML legend. Non-finite values are left out; a chart with no points says so."""
    lines = [
        replace(ln, points=[(x, y) for x, y in ln.points if math.isfinite(x) and math.isfinite(y)]) for ln in lines
    ]
    lines = [ln for ln in lines if ln.points]
    caption = f"<figcaption>{escape(title)}</figcaption>"
    if not lines:
        return f'<figure class="chart empty">{caption}<p class="none">nothing logged</p></figure>'
    left, right, top, bottom = 58, 14, 12, 34
    xs = [x for ln in lines for x, _ in ln.points] + [m.x for m in marks]
    x0, x1 = _bounds(xs) if len(set(xs)) == 1 else (min(xs), max(xs))
    y0, y1 = _bounds([y for ln in lines for _, y in ln.points])
    plot_w, plot_h = width - left - right, height - top - bottom

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * plot_w

    def py(y: float) -> float:
        return top + (y1 - y) / (y1 - y0) * plot_h

    parts = [
        f'<svg class="plot" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}">',
        f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="#fff" stroke="#ccc"/>',
    ]
    for t in nice_ticks(y0, y1):
        y = py(t)
        parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>')
        parts.append(f'<text x="{left - 5}" y="{y + 4:.1f}" text-anchor="end" class="tick">{_fmt(t)}</text>')
    for t in nice_ticks(x0, x1, 6):
        x = px(t)
        parts.append(f'<text x="{x:.1f}" y="{top + plot_h + 14}" text-anchor="middle" class="tick">{_fmt(t)}</text>')
    for m in marks:
        x = px(m.x)
        parts.append(
            f'<line class="mark" x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{top + plot_h}" stroke="{m.color}" '
            f'stroke-dasharray="4 3"/><text x="{x + 3:.1f}" y="{top + 11}" class="mark-label" fill="{m.color}">'
            f"{escape(m.label)}</text>"
        )
    for ln in lines:
        points = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in ln.points)
        parts.append(
            f'<polyline class="series" points="{points}" fill="none" stroke="{ln.color}" stroke-width="1.6"'
            f"{_dash(ln.dash)}>"
            f"<title>{escape(ln.label)}</title></polyline>"
        )
        if ln.dots or len(ln.points) == 1:
            parts += [
                f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.6" fill="{ln.color}"><title>{escape(ln.label)}: '
                f"step {_fmt(x)}, {_fmt(y)}</title></circle>"
                for x, y in ln.points
            ]
    parts.append(f'<text x="{left + plot_w}" y="{height - 3}" text-anchor="end" class="axis">step</text>')
    parts.append("</svg>")
    legend = "".join(
        f'<li><svg width="22" height="8" aria-hidden="true"><line x1="0" x2="22" y1="4" y2="4" stroke="{ln.color}" '
        f'stroke-width="2"{_dash(ln.dash)}/></svg>{escape(ln.label)}</li>'
        for ln in lines
    )
    return f'<figure class="chart">{caption}{"".join(parts)}<ul class="legend">{legend}</ul></figure>'
