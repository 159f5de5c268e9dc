"""Inline SVG line charts (log or linear axes, legend, hover titles): no JavaScript, no network."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from html import escape

PALETTE = [
    "#1f77b4",
    "#d62728",
    "#2ca02c",
    "#ff7f0e",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#17becf",
    "#bcbd22",
    "#7f7f7f",
    "#393b79",
    "#ad494a",
    "#637939",
    "#8c6d31",
    "#843c39",
    "#5254a3",
]


class ColorMap:
    """One colour per label across a whole report, so a mechanism looks the same in every chart."""

    FIXED = {"SDPA softmax": "#111111", "naive softmax": "#888888"}

    def __init__(self) -> None:
        self._colors: dict[str, str] = {}

    def reset(self) -> None:
        self._colors.clear()

    def get(self, label: str) -> str:
        if label in self.FIXED:
            return self.FIXED[label]
        if label not in self._colors:
            self._colors[label] = PALETTE[len(self._colors) % len(PALETTE)]
        return self._colors[label]


COLORS = ColorMap()


@dataclass
class Series:
    label: str
    points: list[tuple[float, float]]
    dashed: bool = False  # baselines are drawn dashed
    color: str | None = None


@dataclass
class Chart:
    title: str
    x_label: str
    y_label: str
    series: list[Series] = field(default_factory=list)
    log_x: bool = True
    log_y: bool = True
    reference_y: float | None = None  # a horizontal guide (e.g. speed-up = 1)
    y_format: str = "{:.3g}"


def _ticks_log(lo: float, hi: float) -> list[float]:
    """1-2-5 ticks per decade inside [lo, hi] (thinned to at most ~8)."""
    ticks = []
    for e in range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1):
        for m in (1, 2, 5):
            v = m * 10.0**e
            if lo <= v <= hi:
                ticks.append(v)
    while len(ticks) > 8:
        ticks = ticks[::2]
    return ticks or [lo, hi]


def _ticks_linear(lo: float, hi: float) -> list[float]:
    if hi <= lo:
        return [lo]
    step = 10 ** math.floor(math.log10((hi - lo) / 4))
    for m in (1, 2, 5, 10):
        if (hi - lo) / (step * m) <= 6:
            step *= m
            break
    start = math.ceil(lo / step) * step
    return [start + i * step for i in range(int((hi - start) / step) + 1)]


def _fmt(v: float) -> str:
    if v >= 1024 and float(v).is_integer() and int(v) % 1024 == 0:
        return f"{int(v) // 1024}K"
    if v >= 1000:
        return f"{v:,.0f}"
    return f"{v:.3g}"


def render(chart: Chart, width: int = 660, height: int = 340) -> str:
    """The chart as an ``<svg class="chart">`` element (empty-data charts say so instead)."""
    pts = [(x, y) for s in chart.series for x, y in s.points if _ok(x, chart.log_x) and _ok(y, chart.log_y)]
    if not pts:
        return f'<p class="empty">{escape(chart.title)}: no data.</p>'
    left, right, top, bottom = 64, 190, 30, 46
    height = max(height, top + 16 * len(chart.series) + 12)  # room for every legend entry
    pw, ph = width - left - right, height - top - bottom
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    if chart.reference_y is not None:
        ys.append(chart.reference_y)
    x_lo, x_hi = min(xs), max(xs)
    y_lo, y_hi = min(ys), max(ys)
    if chart.log_y:
        y_lo, y_hi = y_lo / 1.3, y_hi * 1.3
    else:
        pad = (y_hi - y_lo) * 0.08 or abs(y_hi) * 0.1 or 1.0
        y_lo, y_hi = y_lo - pad, y_hi + pad
    if x_lo == x_hi:
        x_lo, x_hi = (x_lo / 2, x_hi * 2) if chart.log_x else (x_lo - 1, x_hi + 1)

    def sx(x: float) -> float:
        f = (
            (math.log(x) - math.log(x_lo)) / (math.log(x_hi) - math.log(x_lo))
            if chart.log_x
            else ((x - x_lo) / (x_hi - x_lo))
        )
        return left + f * pw

    def sy(y: float) -> float:
        f = (
            (math.log(y) - math.log(y_lo)) / (math.log(y_hi) - math.log(y_lo))
            if chart.log_y
            else ((y - y_lo) / (y_hi - y_lo))
        )
        return top + ph - f * ph

    out = [
        f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(chart.title)}">',
        f'<text x="{left}" y="18" class="title">{escape(chart.title)}</text>',
        f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" class="frame"/>',
    ]
    x_ticks = (
        sorted(set(xs))
        if chart.log_x and len(set(xs)) <= 10
        else (_ticks_log(x_lo, x_hi) if chart.log_x else _ticks_linear(x_lo, x_hi))
    )
    for t in x_ticks:
        x = sx(t)
        out.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top + ph}" class="grid"/>')
        out.append(f'<text x="{x:.1f}" y="{top + ph + 15}" class="tick" text-anchor="middle">{_fmt(t)}</text>')
    for t in _ticks_log(y_lo, y_hi) if chart.log_y else _ticks_linear(y_lo, y_hi):
        y = sy(t)
        out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + pw}" y2="{y:.1f}" class="grid"/>')
        out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" class="tick" text-anchor="end">{_fmt(t)}</text>')
    if chart.reference_y is not None:
        y = sy(chart.reference_y)
        out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + pw}" y2="{y:.1f}" class="guide"/>')
    out.append(
        f'<text x="{left + pw / 2}" y="{height - 8}" class="axis" text-anchor="middle">{escape(chart.x_label)}</text>'
    )
    out.append(
        f'<text x="14" y="{top + ph / 2}" class="axis" text-anchor="middle" '
        f'transform="rotate(-90 14 {top + ph / 2})">{escape(chart.y_label)}</text>'
    )
    for i, s in enumerate(chart.series):
        color = s.color or COLORS.get(s.label)
        good = [(x, y) for x, y in sorted(s.points) if _ok(x, chart.log_x) and _ok(y, chart.log_y)]
        if not good:
            continue
        d = " ".join(f"{'M' if j == 0 else 'L'}{sx(x):.1f},{sy(y):.1f}" for j, (x, y) in enumerate(good))
        dash = ' stroke-dasharray="5,4"' if s.dashed else ""
        out.append(f'<path class="series" d="{d}" stroke="{color}" fill="none" stroke-width="2"{dash}/>')
        for x, y in good:
            out.append(
                f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{color}"><title>'
                f"{escape(s.label)}: {_fmt(x)} -> {chart.y_format.format(y)}</title></circle>"
            )
        ly = top + 8 + i * 16
        out.append(
            f'<line x1="{left + pw + 10}" y1="{ly}" x2="{left + pw + 30}" y2="{ly}" stroke="{color}" '
            f'stroke-width="2"{dash}/>'
        )
        out.append(f'<text x="{left + pw + 34}" y="{ly + 4}" class="legend">{escape(s.label[:26])}</text>')
    out.append("</svg>")
    return "\n".join(out)


def _ok(v: float | None, log: bool) -> bool:
    return v is not None and math.isfinite(v) and (v > 0 if log else True)
