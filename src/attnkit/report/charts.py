"""Charts for the report, drawn with matplotlib and inlined as SVG (no JavaScript, no network).

A chart is data (``Chart`` of ``Series``; ``Scatter`` of ``Point``; ``Heatmap``; ``Bars``); ``render``
(``render_scatter``, ``render_heatmap``, ``render_bars``) draws it with matplotlib's Agg-free SVG
backend and returns an ``<figure>`` holding the ``<svg class="chart" data-kind="…">``. One colour per
label across the whole report (``COLORS``), baselines dashed, doubtful points drawn hollow. Each line,
point, bar or heatmap grid is an SVG group ``id="series-N"``, whose marks the report's browser test
checks were drawn.
"""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass, field
from html import escape

import matplotlib
import numpy as np

matplotlib.use("svg")  # no display, no Tk: the report is written by a CLI, maybe on a server

import matplotlib.pyplot as plt  # noqa: E402 - after choosing the backend
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: E402

matplotlib.rcParams.update(
    {
        "svg.fonttype": "none",  # text stays text: small files, selectable, the page's font
        "svg.hashsalt": "attnkit",  # stable ids: the same store gives the same file
        "font.size": 9,
        "axes.spines.top": False,
        "axes.spines.right": False,
        "axes.grid": True,
        "grid.color": "#e8e8e8",
        "legend.frameon": False,
    }
)

MAX_LINES = 8  # more lines than this are unreadable: callers split or choose
PALETTE = list(plt.get_cmap("tab10").colors) + list(plt.get_cmap("Dark2").colors)


class ColorMap:
    """One colour per label across a whole report, so a mechanism looks the same in every chart."""

    FIXED = {"SDPA softmax": "#111111", "naive softmax": "#888888"}

    def __init__(self) -> None:
        self._colors: dict[str, object] = {}

    def reset(self) -> None:
        self._colors.clear()

    def get(self, label: str):
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
    doubtful: set[float] = field(default_factory=set)  # x values whose figure is doubtful (hollow marker)


@dataclass
class Chart:
    title: str  # short: it must fit above the plot
    x_label: str
    y_label: str
    series: list[Series] = field(default_factory=list)
    log_x: bool = True
    log_y: bool = True
    reference_y: float | None = None  # a horizontal guide (e.g. speed-up = 1)
    caption: str = ""  # what the title leaves out (threads, shapes), under the chart


def _tokens(v: float, _pos=None) -> str:
    if v >= 1024 and float(v).is_integer() and int(v) % 1024 == 0:
        return f"{int(v) // 1024}K"
    return f"{v:g}"


def plain(text: str) -> str:
    """Text as matplotlib draws it literally: ``$`` would start mathtext (and a store may hold one)."""
    return str(text).replace("$", r"\$")


def _ok(v: float | None, log: bool) -> bool:
    return v is not None and math.isfinite(v) and (v > 0 if log else True)


def render(chart: Chart) -> str:
    """The chart as ``<figure><svg class="chart">…</svg><figcaption>…</figcaption></figure>``."""
    series = [s for s in chart.series if any(_ok(x, chart.log_x) and _ok(y, chart.log_y) for x, y in s.points)]
    if not series:
        return f'<p class="empty">{escape(chart.title)}: no data.</p>'
    if len(series) > MAX_LINES + 2:  # + 2: the baselines
        raise ValueError(f"{len(series)} lines in one chart ({chart.title!r}); split it (at most {MAX_LINES})")
    fig, ax = plt.subplots(figsize=(6.2, 3.5), layout="constrained")
    try:
        for i, s in enumerate(series):
            pts = sorted((x, y) for x, y in s.points if _ok(x, chart.log_x) and _ok(y, chart.log_y))
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            color = COLORS.get(s.label)
            (line,) = ax.plot(xs, ys, color=color, linestyle="--" if s.dashed else "-", linewidth=1.6,
                              marker="o", markersize=3.5, label=plain(s.label[:32]))  # fmt: skip
            line.set_gid(f"series-{i}")
            hollow = [(x, y) for x, y in pts if x in s.doubtful]
            if hollow:
                ax.plot([p[0] for p in hollow], [p[1] for p in hollow], linestyle="none", marker="o", markersize=7,
                        markerfacecolor="white", markeredgecolor=color)  # fmt: skip
        if chart.reference_y is not None:
            ax.axhline(chart.reference_y, color="#888", linewidth=0.8, linestyle=":")
        if chart.log_x:
            ax.set_xscale("log", base=2)
            xs_all = sorted({x for s in series for x, _ in s.points if _ok(x, True)})
            if len(xs_all) <= 10:
                ax.set_xticks(xs_all)
            ax.xaxis.set_major_formatter(FuncFormatter(_tokens))
            ax.xaxis.set_minor_formatter(NullFormatter())
        if chart.log_y:
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _p: f"{v:g}"))
            ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_title(plain(chart.title), loc="left", fontsize=10, fontweight="bold")
        ax.set_xlabel(plain(chart.x_label))
        ax.set_ylabel(plain(chart.y_label))
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, handlelength=2.2)
        return _figure(fig, chart.title, chart.caption, "lines")
    finally:
        plt.close(fig)


def _figure(fig, title: str, caption: str, kind: str) -> str:
    """The figure as inline SVG in a ``<figure>``; ``data-kind`` tells the browser test what it drew."""
    buf = io.StringIO()
    fig.savefig(buf, format="svg")
    svg = buf.getvalue()
    svg = svg[svg.index("<svg") :]  # drop the XML prologue and doctype: inline SVG in HTML
    head = f'<svg class="chart" data-kind="{kind}" role="img" aria-label="{escape(title)}" '
    svg = re.sub(r"<svg ", head, svg, count=1)
    caption = f"<figcaption>{escape(caption)}</figcaption>" if caption else ""
    return f'<figure class="chart">{svg}{caption}</figure>'


@dataclass
class Point:
    label: str
    x: float
    y: float
    front: bool = False  # on the Pareto front: drawn larger, labelled in bold, joined by the front's line


@dataclass
class Scatter:
    """One point per mechanism (quality against speed); every point is labelled."""

    title: str
    x_label: str
    y_label: str
    points: list[Point] = field(default_factory=list)
    log_x: bool = True
    reference_x: float | None = 1.0  # a vertical guide (speed-up = 1: as fast as SDPA)
    reference_y: float | None = 0.0  # a horizontal guide (CI = 0: the reference mean)
    caption: str = ""


def render_scatter(chart: Scatter) -> str:
    """Each point is its own group ``id="series-N"``; the Pareto front is a dashed staircase through its points
    (the edge of the region its points beat), higher and further right being better."""
    points = [p for p in chart.points if _ok(p.x, chart.log_x) and _ok(p.y, False)]
    if not points:
        return f'<p class="empty">{escape(chart.title)}: no data.</p>'
    fig, ax = plt.subplots(figsize=(6.2, 3.8), layout="constrained")
    try:
        if chart.reference_x is not None:
            ax.axvline(chart.reference_x, color="#888", linewidth=0.8, linestyle=":")
        if chart.reference_y is not None:
            ax.axhline(chart.reference_y, color="#888", linewidth=0.8, linestyle=":")
        front = sorted((p for p in points if p.front), key=lambda p: (p.x, -p.y))
        if len(front) > 1:
            (line,) = ax.plot([p.x for p in front], [p.y for p in front], drawstyle="steps-pre", color="#555",
                              linestyle="--", linewidth=1.0)  # fmt: skip
            line.set_gid("pareto-front")
        for i, p in enumerate(sorted(points, key=lambda p: p.label)):
            color = COLORS.get(p.label)
            edge = "#222" if p.front else color
            (dot,) = ax.plot([p.x], [p.y], linestyle="none", marker="D" if p.front else "o",
                             markersize=7 if p.front else 5, color=color, markeredgecolor=edge)  # fmt: skip
            dot.set_gid(f"series-{i}")
            ax.annotate(plain(p.label[:32]), (p.x, p.y), xytext=(5, 4), textcoords="offset points", fontsize=7.5,
                        fontweight="bold" if p.front else "normal", color="#111" if p.front else "#555")  # fmt: skip
        if chart.log_x:
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _p: f"{v:g}×"))
            ax.xaxis.set_minor_formatter(NullFormatter())
            xs = [p.x for p in points]
            lo, hi = min(xs + [chart.reference_x or min(xs)]), max(xs + [chart.reference_x or max(xs)])
            ax.set_xlim(lo / 1.5, hi * 1.8)  # room for the labels on the right
        ax.margins(y=0.15)
        return _labelled(fig, ax, chart, "scatter")
    finally:
        plt.close(fig)


def _labelled(fig, ax, chart, kind: str) -> str:
    """Title and axis labels from ``chart``, then the figure as inline SVG (``data-kind=kind``)."""
    ax.set_title(plain(chart.title), loc="left", fontsize=10, fontweight="bold")
    ax.set_xlabel(plain(chart.x_label))
    ax.set_ylabel(plain(chart.y_label))
    return _figure(fig, chart.title, chart.caption, kind)


@dataclass
class Heatmap:
    """A grid of values with the number written in each cell (missing cells: "–")."""

    title: str
    rows: list[str]
    columns: list[str]
    values: list[list[float | None]]  # [row][column]
    x_label: str = ""
    y_label: str = ""
    vmin: float = 0.0
    vmax: float = 1.0
    caption: str = ""
    fmt: str = "{:.2f}"


def render_heatmap(chart: Heatmap) -> str:
    """The grid is one mesh in the group ``id="series-0"`` (one ``<path>`` per cell)."""
    if not chart.rows or not chart.columns or all(v is None for row in chart.values for v in row):
        return f'<p class="empty">{escape(chart.title)}: no data.</p>'
    grid = np.ma.masked_invalid(np.array([[math.nan if v is None else v for v in row] for row in chart.values]))
    width = min(9.5, 1.6 + 0.55 * len(chart.columns) + 0.06 * max(len(r) for r in chart.rows))
    fig, ax = plt.subplots(figsize=(max(3.6, width), 1.1 + 0.28 * len(chart.rows)), layout="constrained")
    try:
        ax.grid(False)
        ax.set_facecolor("#f0f0f0")  # missing cells
        mesh = ax.pcolormesh(grid, cmap="viridis", vmin=chart.vmin, vmax=chart.vmax, edgecolors="white",
                             linewidth=0.5)  # fmt: skip
        mesh.set_gid("series-0")
        middle = (chart.vmin + chart.vmax) / 2
        for i, row in enumerate(chart.values):
            for j, v in enumerate(row):
                text = "–" if v is None else chart.fmt.format(v)
                color = "#444" if v is None else ("white" if v < middle else "black")
                ax.text(j + 0.5, i + 0.5, text, ha="center", va="center", fontsize=7, color=color)
        ax.set_xticks([j + 0.5 for j in range(len(chart.columns))], [plain(c) for c in chart.columns], fontsize=7.5)
        ax.set_yticks([i + 0.5 for i in range(len(chart.rows))], [plain(r[:28]) for r in chart.rows], fontsize=7.5)
        ax.invert_yaxis()  # the first row at the top, as in the table
        ax.tick_params(length=0)
        for side in ("left", "bottom"):
            ax.spines[side].set_visible(False)
        fig.colorbar(mesh, ax=ax, fraction=0.04, pad=0.02)
        return _labelled(fig, ax, chart, "heatmap")
    finally:
        plt.close(fig)


@dataclass
class Bars:
    """A horizontal bar per label, in the given order (the first at the top)."""

    title: str
    x_label: str
    items: list[tuple[str, float]] = field(default_factory=list)
    caption: str = ""


def render_bars(chart: Bars) -> str:
    """Each bar is its own group ``id="series-N"``."""
    items = [(label, v) for label, v in chart.items if _ok(v, False)]
    if not items:
        return f'<p class="empty">{escape(chart.title)}: no data.</p>'
    fig, ax = plt.subplots(figsize=(6.2, 1.0 + 0.3 * len(items)), layout="constrained")
    try:
        ys = list(range(len(items)))
        bars = ax.barh(ys, [v for _, v in items], color=[COLORS.get(label) for label, _ in items], height=0.7)
        for i, bar in enumerate(bars):
            bar.set_gid(f"series-{i}")
        ax.set_yticks(ys, [plain(label[:32]) for label, _ in items], fontsize=8)
        ax.invert_yaxis()
        ax.axvline(0.0, color="#888", linewidth=0.8)
        ax.grid(axis="y", visible=False)
        ax.set_title(plain(chart.title), loc="left", fontsize=10, fontweight="bold")
        ax.set_xlabel(plain(chart.x_label))
        return _figure(fig, chart.title, chart.caption, "bars")
    finally:
        plt.close(fig)
