"""Charts for the report, drawn with matplotlib and inlined as SVG (no JavaScript, no network).

A chart is data (``Chart`` of ``Series``); ``render`` draws it with matplotlib's Agg-free SVG
backend and returns an ``<figure>`` holding the ``<svg class="chart">``. One colour per label across
the whole report (``COLORS``), baselines dashed, doubtful points drawn hollow. Each line is an SVG
group ``id="series-N"``, which the report's browser test counts.
"""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass, field
from html import escape

import matplotlib

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
        buf = io.StringIO()
        fig.savefig(buf, format="svg")
    finally:
        plt.close(fig)
    svg = buf.getvalue()
    svg = svg[svg.index("<svg") :]  # drop the XML prologue and doctype: inline SVG in HTML
    svg = re.sub(r"<svg ", f'<svg class="chart" role="img" aria-label="{escape(chart.title)}" ', svg, count=1)
    caption = f"<figcaption>{escape(chart.caption)}</figcaption>" if chart.caption else ""
    return f'<figure class="chart">{svg}{caption}</figure>'
