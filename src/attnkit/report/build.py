"""``attnkit report``: one self-contained HTML file from the results store (opens with no network)."""

from __future__ import annotations

import time
from html import escape
from pathlib import Path

from .. import __version__
from ..bench.store import Store
from . import sections, svg

STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto; max-width: 1400px;
       padding: 0 24px 48px; color: #222; }
h1 { margin: 24px 0 4px; } h2 { margin-top: 36px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
nav a { margin-right: 14px; } .sub { color: #666; margin-top: 0; }
.charts { display: flex; flex-wrap: wrap; gap: 12px; }
svg.chart { background: #fff; border: 1px solid #e3e3e3; border-radius: 4px; }
svg .title { font-size: 13px; font-weight: 600; } svg .tick { font-size: 10px; fill: #555; }
svg .axis { font-size: 11px; fill: #333; } svg .legend { font-size: 10.5px; fill: #222; }
svg .frame { fill: none; stroke: #bbb; } svg .grid { stroke: #eee; } svg .guide { stroke: #888; stroke-dasharray: 2,3; }
table { border-collapse: collapse; margin: 8px 0; font-size: 12.5px; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; } th { background: #f5f5f5; }
td { font-variant-numeric: tabular-nums; } .empty { color: #888; font-style: italic; }
code { background: #f3f3f3; padding: 0 3px; border-radius: 3px; }
"""

# Marks the page as rendered for the end-to-end test: counts charts that drew at least one series.
CHECK_SCRIPT = """
window.addEventListener('error', function () {
  document.body.setAttribute('data-js-errors', String(1 + Number(document.body.getAttribute('data-js-errors') || 0)));
});
window.addEventListener('load', function () {
  var charts = document.querySelectorAll('svg.chart'), drawn = 0;
  charts.forEach(function (svg) {
    var box = svg.getBBox();
    if (svg.querySelectorAll('path.series').length > 0 && box.width > 0 && box.height > 0) drawn++;
  });
  document.body.setAttribute('data-charts', String(charts.length));
  document.body.setAttribute('data-charts-drawn', String(drawn));
});
"""

SECTIONS = [
    ("machine", "Machine and versions", sections.machine),
    ("scaling", "Latency scaling (log-log)", sections.scaling),
    ("speedup", "Speed-up over SDPA softmax", sections.speedup),
    ("efficiency", "Efficiency length and scaling exponent", sections.efficiency),
    ("memory", "Peak memory", sections.memory),
    ("fidelity", "Fidelity: distance from exact softmax", sections.fidelity),
    ("decode", "Decoding cost and state size", sections.decode),
    ("peers", "Peers", sections.peers),
    ("problems", "Skipped and failed cases", sections.problems),
]


def build_report(db: str | Path, out: str | Path) -> Path:
    """Render every section from the store at ``db`` into ``out``; returns the written path."""
    with Store(db, readonly=True) as store:
        rows = store.results()
        runs = store.runs()
    svg.COLORS.reset()
    body = []
    for anchor, title, fn in SECTIONS:
        content = fn(runs, str(db)) if anchor == "machine" else fn(rows)
        wrap = "charts" if "<svg" in content else "block"
        body.append(f'<section id="{anchor}"><h2>{escape(title)}</h2><div class="{wrap}">{content}</div></section>')
    nav = " ".join(f'<a href="#{a}">{escape(t)}</a>' for a, t, _ in SECTIONS)
    measured = sum(1 for r in rows if r["status"] == "ok")
    devices = sorted({r["device"] for r in rows if r.get("device")})
    html = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>attnkit report</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{STYLE}</style></head>
<body><h1>attnkit benchmark report</h1>
<p class="sub">attnkit {__version__} · {measured} measurements on {escape(", ".join(devices) or "no device")} ·
written {time.strftime("%Y-%m-%d %H:%M")}</p>
<nav>{nav}</nav>
{"".join(body)}
<script>{CHECK_SCRIPT}</script></body></html>
"""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(html, encoding="utf-8")
    return out
