"""One self-contained HTML page of an analysis: it opens with the answer (sink heads and where, no-op heads,
the clearest role heads), then a layer x head grid of thumbnails, a head view (token-to-token lines, or a
patch grid for an image model), the metric tables (sortable by clicking a column header), the cluster map and
the PNG plots. Nothing is fetched: style and script are inline, images are base64 PNG or inline SVG, and a
Content-Security-Policy forbids any request.

Long inputs stay responsive: the head view carries only the strongest keys of each query (see
:mod:`attnkit.analysis.page_data` for the budget) and draws 64 queries at a time.
"""

from __future__ import annotations

import base64
import logging
import math
import time
from collections.abc import Mapping
from html import escape
from pathlib import Path

from .. import __version__
from .._files import write_text_file
from . import page_data
from .maps import AttentionMaps, HeadMetrics
from .page_assets import SCRIPT, STYLE
from .plots import check_views, render_plots

log = logging.getLogger(__name__)

# no request of any kind: images only from data: URIs, style and script only inline
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"
TAB10 = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]
SECTIONS = [
    ("answer", "The answer"),
    ("grid", "Every head"),
    ("head", "Head view"),
    ("tables", "Metrics per head"),
    ("clusters", "Cluster map"),
    ("plots", "Plots"),
]


def _fmt(v: float) -> str:
    if not math.isfinite(v):
        return "–"
    return f"{v:.3g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"


def metric_table(metrics: HeadMetrics) -> str:
    """Every head a row (layer, head, roles, each metric), sortable; a row's click opens its head view."""
    names = list(metrics.table)
    head = "".join(
        f'<th title="{escape(metrics.descriptions.get(n, ""))}">{escape(n)}</th>' for n in ["layer", "head", "roles"]
    )
    head += "".join(f'<th title="{escape(metrics.descriptions.get(n, ""))}">{escape(n)}</th>' for n in names)
    rows = []
    for l, row in enumerate(metrics.roles):
        for h, roles in enumerate(row):
            cells = [f'<td data-v="{l}">{l}</td>', f'<td data-v="{h}">{h}</td>', f"<td>{escape(', '.join(roles))}</td>"]
            for n in names:
                v = float(metrics.table[n][l, h])
                cells.append(f'<td data-v="{v if math.isfinite(v) else ""}">{_fmt(v)}</td>')
            rows.append(f'<tr data-l="{l}" data-h="{h}">{"".join(cells)}</tr>')
    return (
        f'<table class="sortable" id="metric-table"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def sink_table(metrics: HeadMetrics) -> str:
    if not metrics.sinks:
        return '<p class="note">No sink token was detected.</p>'
    rows = "".join(
        f'<tr><td data-v="{pos}">{pos}</td><td>{escape(label)}</td><td data-v="{mass}">{_fmt(mass)}</td></tr>'
        for pos, label, mass in metrics.sinks
    )
    return (
        '<table class="sortable" id="sink-table"><thead><tr><th>position</th><th>token</th>'
        f"<th>largest share of one head's attention</th></tr></thead><tbody>{rows}</tbody></table>"
    )


def cluster_svg(metrics: HeadMetrics, heads: int, size: int = 520) -> str:
    """The heads' 2-D embedding as an inline SVG scatter: colour = cluster, label L.H, click = head view."""
    xy = metrics.embedding.float().nan_to_num(0.0)
    lo, hi = xy.min(0).values, xy.max(0).values
    span = (hi - lo).clamp_min(1e-12)
    pad = 24
    pts = ((xy - lo) / span * (size - 2 * pad) + pad).tolist()
    marks = []
    for i, (x, y) in enumerate(pts):
        l, h, c = i // heads, i % heads, int(metrics.clusters[i])
        y = size - y  # up is up
        marks.append(
            f'<g data-l="{l}" data-h="{h}"><circle cx="{x:.1f}" cy="{y:.1f}" r="6" fill="{TAB10[c % 10]}">'
            f"<title>L{l}.H{h}, cluster {c}</title></circle>"
            f'<text x="{x + 7:.1f}" y="{y + 3:.1f}">{l}.{h}</text></g>'
        )
    return (
        f'<svg class="clusters" width="{size}" height="{size}" viewBox="0 0 {size} {size}" role="img" '
        f'aria-label="heads by Jensen-Shannon distance">{"".join(marks)}</svg>'
    )


def _images(images: Mapping[str, bytes]) -> str:
    return "".join(
        f'<figure><img alt="{escape(stem)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'
        f"<figcaption>{escape(stem)}.png</figcaption></figure>"
        for stem, png in images.items()
    )


def _head_view_note(payload: dict) -> str:
    shown = len(payload["inputs"])
    first = payload["inputs"][0]
    text = f"The strongest {first['k']} keys of each query are kept"
    if first["k"] >= len(first["tokens"]):
        text = "Every key of each query is kept (the view is exact)"
    if shown < payload["batch"]:
        text += f"; the first {shown} of {payload['batch']} inputs are offered (the metrics cover all)"
    if first["queries"] < len(first["tokens"]):
        text += f"; only the first {first['queries']} queries of an input are carried"
    return escape(text + ".")


def render(maps: AttentionMaps, metrics: HeadMetrics, *, title: str, images: Mapping[str, bytes]) -> str:
    """The page's HTML text."""
    layers, heads = check_views(maps, metrics)
    payload = page_data.head_view(maps)
    answer = "".join(f"<li>{escape(line)}</li>" for line in page_data.summary(maps, metrics))
    nav = " ".join(f'<a href="#{a}">{escape(t)}</a>' for a, t in SECTIONS)
    mechanisms = ", ".join(sorted(set(maps.mechanisms)))
    sub = (
        f"attnkit {__version__} · {maps.source} model, {layers} layers x {heads} heads ({mechanisms}) · "
        f"{maps.batch} input(s) · written {time.strftime('%Y-%m-%d %H:%M')}"
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="Content-Security-Policy" content="{CSP}">
<title>{escape(title)}</title><meta name="viewport" content="width=device-width, initial-scale=1">
<style>{STYLE}</style></head>
<body><h1>{escape(title)}</h1><p class="sub">{escape(sub)}</p><nav>{nav}</nav>
<section id="answer"><h2>The answer</h2><ul class="answer">{answer}</ul></section>
<section id="grid"><h2>Every head: layer x head</h2>
<p class="note">Input 1's attention map of each head (|weight| pooled to at most {page_data.THUMB} x
{page_data.THUMB}, each scaled to its own largest); click one for its head view.</p><div id="thumbs"></div></section>
<section id="head"><h2>Head view</h2><div class="controls"><label>input <select id="sel-input"></select></label>
<label>layer <select id="sel-layer"></select></label><label>head <select id="sel-head"></select></label>
<label>queries from <input type="range" id="sel-from" min="0" max="0" value="0"></label></div>
<p class="note">{_head_view_note(payload)}</p><p class="note" id="head-note"></p><div id="headview"></div></section>
<section id="tables"><h2>Metrics per head</h2><p class="note">Click a column header to sort, a row for its head
view; hover a header for the metric's definition.</p>{metric_table(metrics)}<h3>Sink tokens</h3>{sink_table(metrics)}
</section>
<section id="clusters"><h2>Cluster map</h2><p class="note">Heads placed by the Jensen-Shannon distance between
their attention rows (classical MDS), coloured by cluster; click a head for its view.</p>
{cluster_svg(metrics, heads)}</section>
<section id="plots"><h2>Plots</h2><div class="plots">{_images(images)}</div></section>
<script type="application/json" id="attn-data">{page_data.to_script_json(payload)}</script>
<script>{SCRIPT}</script></body></html>
"""


def write_page(
    maps: AttentionMaps,
    metrics: HeadMetrics,
    path: str | Path,
    *,
    title: str = "attnkit attention analysis",
    images: Mapping[str, bytes] | None = None,
) -> Path:
    """Write the page to ``path`` (folders made as needed) and return it. ``images``: PNG bytes by name to show
    (default: :func:`attnkit.analysis.plots.render_plots` of the same maps and metrics)."""
    check_views(maps, metrics)
    if images is None:
        images = render_plots(maps, metrics)
    html = render(maps, metrics, title=title, images=images)
    out = write_text_file(path, html, "page")
    log.info("wrote %s (%.1f MB)", out, len(html) / 1e6)
    return out
