"""``attnkit report``: one self-contained HTML file from the results store (opens with no network)."""

from __future__ import annotations

import time
from html import escape
from pathlib import Path

from .. import __version__
from .._files import write_text_file
from ..bench.store import Store
from . import catalogue, charts, cp, sections
from .answer import answer
from .quality import quality

STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto; max-width: 1400px;
       padding: 0 24px 48px; color: #222; }
h1 { margin: 24px 0 4px; } h2 { margin-top: 36px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
nav a { margin-right: 14px; } .sub { color: #666; margin-top: 0; }
.charts { display: flex; flex-wrap: wrap; gap: 12px; }
figure.chart { margin: 0; background: #fff; border: 1px solid #e3e3e3; border-radius: 4px; padding: 4px; }
figure.chart svg { display: block; max-width: 100%; height: auto; }
figcaption { font-size: 11px; color: #666; padding: 0 6px 4px; box-sizing: border-box;
             width: 0; min-width: 100%; }  /* as wide as its chart: a long caption wraps */
.doubt { color: #b35900; font-weight: 700; cursor: help; } .note { color: #555; width: 100%; }
table.answer td { font-size: 13.5px; padding: 5px 10px; }
table { border-collapse: collapse; margin: 8px 0; font-size: 12.5px; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; } th { background: #f5f5f5; }
td { font-variant-numeric: tabular-nums; } .empty { color: #888; font-style: italic; }
code { background: #f3f3f3; padding: 0 3px; border-radius: 3px; }
.qblock { width: 100%; } h3 { margin: 20px 0 6px; font-size: 15px; }
"""

# Marks the page as rendered for the end-to-end test: counts charts that drew at least one series mark
# (a line, a point, a bar, a heatmap cell: a path or a marker's <use> inside a g#series-N, not the marker
# definitions under <defs>) with a non-empty box, and lists the kinds of chart (data-kind) that drew.
CHECK_SCRIPT = """
window.addEventListener('error', function () {
  document.body.setAttribute('data-js-errors', String(1 + Number(document.body.getAttribute('data-js-errors') || 0)));
});
window.addEventListener('load', function () {
  var charts = document.querySelectorAll('svg.chart'), drawn = 0, kinds = {};
  charts.forEach(function (svg) {
    var box = svg.getBoundingClientRect();
    var marks = Array.prototype.filter.call(
      svg.querySelectorAll('g[id^="series-"] path, g[id^="series-"] use'),
      function (el) { return !el.closest('defs'); });
    var visible = marks.some(function (el) { var b = el.getBBox(); return b.width > 0 || b.height > 0; });
    if (visible && box.width > 0 && box.height > 0) {
      drawn++;
      kinds[svg.getAttribute('data-kind')] = true;
    }
  });
  document.body.setAttribute('data-charts', String(charts.length));
  document.body.setAttribute('data-charts-drawn', String(drawn));
  document.body.setAttribute('data-kinds-drawn', Object.keys(kinds).sort().join(' '));
});
"""

SECTIONS = [
    ("answer", "The answer: fastest exact and fastest overall, per pattern", answer),
    ("scaling", "Latency scaling (log-log)", sections.scaling),
    ("speedup", "Speed-up over SDPA softmax", sections.speedup),
    ("efficiency", "Efficiency length and scaling exponent", sections.efficiency),
    ("memory", "Peak memory", sections.memory),
    ("fidelity", "Fidelity: distance from exact softmax", sections.fidelity),
    ("quality", "Quality: small models trained on each task", quality),
    ("decode", "Decoding cost and state size", sections.decode),
    ("peers", "Peers", sections.peers),
    ("problems", "Skipped, failed and doubtful cases", sections.problems),
    ("catalogue", "Catalogue: which keys each query sees, per mechanism", catalogue.catalogue),
    ("machine", "Machine and versions", sections.machine),
]


def build_report(db: str | Path, out: str | Path) -> Path:
    """Render every section from the store at ``db`` into ``out``; returns the written path."""
    with Store(db, readonly=True) as store:
        rows = store.results()
        runs = store.runs()
    charts.COLORS.reset()
    body = []
    chosen = SECTIONS
    if any(r["kind"] == "cp" for r in rows):  # context parallelism: only when measured (attnkit bench cp)
        chosen = [*SECTIONS[:-3], ("cp", "Context parallelism: memory per rank, largest T, bytes sent", cp.cp),
                  *SECTIONS[-3:]]  # fmt: skip
    for anchor, title, fn in chosen:
        content = fn(runs, str(db)) if anchor == "machine" else fn(rows)
        wrap = "charts" if "<svg" in content else "block"
        body.append(f'<section id="{anchor}"><h2>{escape(title)}</h2><div class="{wrap}">{content}</div></section>')
    nav = " ".join(f'<a href="#{a}">{escape(t)}</a>' for a, t, _ in chosen)
    measured = sum(1 for r in rows if r["status"] == "ok")
    shaky = sum(1 for r in rows if r["status"] == "ok" and r.get("doubtful"))
    doubtful = f' (<a href="#problems">{shaky} doubtful</a>)' if shaky else ""
    devices = sorted({r["device"] for r in rows if r.get("device")})
    html = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>attnkit report</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{STYLE}</style></head>
<body><h1>attnkit benchmark report</h1>
<p class="sub">attnkit {escape(__version__)} · {measured} measurements{doubtful} on
{escape(", ".join(devices) or "no device")} ·
written {time.strftime("%Y-%m-%d %H:%M")}</p>
<nav>{nav}</nav>
{"".join(body)}
<script>{CHECK_SCRIPT}</script></body></html>
"""
    return write_text_file(out, html, "report")
