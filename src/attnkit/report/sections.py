"""The report's sections: each turns stored rows into HTML (charts and tables), computing nothing new
beyond the derived figures of ``attnkit.bench.derived``."""

from __future__ import annotations

import dataclasses
import math
import time
from collections import defaultdict
from html import escape
from typing import Any

from ..api import info
from ..bench.derived import NAIVE, SDPA, Curve, baseline_of, curves, run_setting, summarise
from ..errors import AttnkitError
from .charts import MAX_LINES, Chart, Series, render

MIB = 2**20


class Html(str):
    """A table cell that is already HTML (everything else is escaped)."""


def cell(value: Any) -> str:
    return value if isinstance(value, Html) else escape("" if value is None else str(value))


def table(headers: list[str], rows: list[list[Any]], cls: str = "") -> str:
    """An HTML table; every cell is escaped unless it is ``Html`` (store fields can hold anything)."""
    if not rows:
        return '<p class="empty">nothing to show.</p>'
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{escape(cls)}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _num(v: float | None, fmt: str = "{:.3g}") -> str:
    if v is None:
        return "—"
    if math.isinf(v):
        return "never"
    return fmt.format(v)


def doubt_mark(reason: str | None) -> Html:
    """A ``?`` whose tooltip says why the figure beside it is doubtful ('' when it is not)."""
    return Html(f'<span class="doubt" title="{escape(reason)}">?</span>' if reason else "")


def _series_of(cs: list[Curve], field: str, scale: float = 1.0) -> list[Series]:
    out = []
    for c in cs:
        pts = [(t, v / scale) for t, v in zip(c.lengths, getattr(c, field), strict=True) if v is not None]
        doubtful = {t for t, d in zip(c.lengths, c.doubtful, strict=False) if d}
        out.append(Series(c.label, pts, dashed=(c.mechanism, c.path) in (SDPA, NAIVE), doubtful=doubtful))
    return out


# Curves are drawn in groups of related mechanisms (each chart also gets the softmax baselines), at
# most MAX_LINES - 2 mechanisms a chart, so that a catalogue of dozens of mechanisms stays readable.
FAMILY_GROUPS = {
    "kernel": "kernel (linear)",
    "decay": "decay and recurrent",
    "recurrent softmax": "decay and recurrent",
    "hybrid": "decay and recurrent",
}
# families named by their first words: "low-rank, trainable" is low-rank, "routed sparse" is routed
FAMILY_PREFIXES = {
    "low-rank": "low-rank",
    "routed": "routed sparse",
    "fixed sparse": "fixed and estimated sparse",
    "sparse": "fixed and estimated sparse",
    "kernel": "kernel (linear)",
}
OTHER_GROUP = "softmax variants"
PER_CHART = MAX_LINES - 2


def _group_of_name(mechanism: str) -> str:
    """The chart group of a mechanism: its family, with related families drawn together."""
    try:
        family = info(mechanism).family
    except AttnkitError:  # a peer's counterpart that attnkit does not have (yet)
        return "peers"
    if family in FAMILY_GROUPS:
        return FAMILY_GROUPS[family]
    return next((g for prefix, g in FAMILY_PREFIXES.items() if family.startswith(prefix)), OTHER_GROUP)


def _group_of(curve: Curve) -> str:
    return _group_of_name(curve.mechanism)


def _by_setting(all_curves: list[Curve], mode: str | None = None) -> dict[tuple, list[Curve]]:
    """(pattern, mode, dtype, device, setting, group) -> its curves (at most PER_CHART, the fastest at the
    longest T first), the SDPA and naive baselines in every group."""
    settings: dict[tuple, list[Curve]] = defaultdict(list)
    for c in all_curves:
        if mode is None or c.mode == mode:
            settings[c.where].append(c)
    groups: dict[tuple, list[Curve]] = {}
    for key, cs in settings.items():
        baselines = [c for c in cs if not c.peer and (c.mechanism, c.path) in (SDPA, NAIVE)]
        names = sorted({_group_of(c) for c in cs if c not in baselines}) or [OTHER_GROUP]
        for name in names:
            members = sorted((c for c in cs if c not in baselines and _group_of(c) == name), key=_last_ms)
            parts = [members[i : i + PER_CHART] for i in range(0, len(members), PER_CHART)] or [[]]
            for n, part in enumerate(parts):
                label = name if len(parts) == 1 else f"{name} ({n + 1}/{len(parts)})"
                groups[(*key, label)] = part + baselines
    return dict(sorted(groups.items()))


def _last_ms(c: Curve) -> float:
    """Latency at the curve's longest T (for ordering: fastest first)."""
    return next((ms for ms in reversed(c.ms) if ms), math.inf)


def _short_title(what: str, key: tuple) -> str:
    pattern, mode, _dtype, _device, _setting, group = key
    return f"{what}: {group}, {pattern} {mode}"


def _caption(key: tuple) -> str:
    pattern, mode, dtype, device, setting, _group = key
    return f"{pattern}, {'forward' if mode == 'fwd' else 'forward + backward'}, {dtype}, {device}, {setting}"


def machine(runs: list[dict[str, Any]], db: str) -> str:
    rows = []
    for r in runs:
        started = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["started_at"])) if r.get("started_at") else "?"
        peak = f"{r['matmul_gflops']:.0f} ({r['matmul_dtype']})" if r.get("matmul_gflops") else "—"
        rows.append([r["run_id"], started, r["status"], r.get("device") or "?", r.get("torch_version") or "?",
                     r.get("python") or "?", r.get("threads") or "?", r.get("git_rev") or "?", peak,
                     r.get("command") or ""])  # fmt: skip
    return f"<p>Store: <code>{escape(db)}</code>. Every figure below is read from it.</p>" + table(
        ["run", "started", "status", "device", "torch", "python", "threads", "git", "matmul GFLOP/s", "command"], rows
    )


NO_SPEED = '<p class="empty">No speed results in this store: run <code>attnkit bench speed</code>.</p>'
DOUBT_NOTE = (
    '<p class="note">Hollow markers and <span class="doubt">?</span> mark doubtful figures: measured while other'
    " processes used the cores, while the machine ran slower, or with a wide spread (hover for the reason).</p>"
)


def scaling(rows: list[dict[str, Any]]) -> str:
    cs = curves(rows)
    if not cs:
        return NO_SPEED
    charts = [
        render(
            Chart(
                _short_title("Latency", key), "T (keys)", "ms (median)", _series_of(group, "ms"), caption=_caption(key)
            )
        )  # fmt: skip
        for key, group in _by_setting(cs).items()
    ]
    return DOUBT_NOTE + "\n".join(charts)


def speedup(rows: list[dict[str, Any]]) -> str:
    cs = curves(rows)
    parts = []
    for key, group in _by_setting(cs).items():
        series = []
        for c in group:
            base = baseline_of(c, cs)
            if base is None or (c.mechanism, c.path) == SDPA:
                continue
            s = summarise(c, base)
            doubtful = {t for t, d in zip(c.lengths, c.doubtful, strict=False) if d}
            series.append(Series(c.label, sorted(s.speedup.items()), dashed=(c.mechanism, c.path) == NAIVE,
                                 doubtful=doubtful))  # fmt: skip
        if series:
            parts.append(render(Chart(_short_title("Speed-up vs SDPA", key), "T (keys)", "SDPA time / mechanism time",
                                      series, reference_y=1.0, caption=_caption(key))))  # fmt: skip
    if not parts:
        return '<p class="empty">No speed results with an SDPA baseline.</p>'
    note = ("<p>Each speed-up is paired: SDPA was timed in the same process, interleaved with the mechanism, and"
            " the figure is the median of the per-round ratios (&gt; 1: faster than SDPA).</p>")  # fmt: skip
    return note + "\n".join(parts)


def efficiency(rows: list[dict[str, Any]]) -> str:
    cs = curves(rows)
    out = []
    for c in cs:
        if (c.mechanism, c.path) == SDPA:
            continue
        base, naive = baseline_of(c, cs), baseline_of(c, cs, NAIVE)
        if base is None:
            continue
        s = summarise(c, base)
        sn = summarise(c, naive) if naive is not None and (c.mechanism, c.path) != NAIVE else None
        t_max = max(s.speedup) if s.speedup else None
        speed = _num(s.speedup.get(t_max), "{:.2f}×") + (f" @ {t_max}" if t_max else "")
        out.append([
            c.label, c.pattern, c.mode, c.dtype, c.device,
            Html(escape(speed) + doubt_mark(c.at(t_max, "doubtful") if t_max else None)),
            _num(s.memory_ratio.get(t_max), "{:.2f}×"), _num(s.exponent, "{:.2f}"),
            _num(s.efficiency_time, "{:,.0f}"), _num(s.efficiency_memory, "{:,.0f}"),
            _num(sn.efficiency_time if sn else None, "{:,.0f}"), _num(sn.efficiency_memory if sn else None, "{:,.0f}"),
            _num(max((g for g in c.gflops if g), default=None), "{:.1f}"),
        ])  # fmt: skip
    note = (
        "<p>Efficiency length (CAB): the sequence length from which the mechanism is cheaper than the"
        " baseline, from a quadratic fit of the baseline and a linear fit of the mechanism (time: without"
        " the smallest T; the baseline's times are those paired with the mechanism). 0 = cheaper at every"
        " measured length; never = no crossing. The exponent is the log-log slope of the mechanism's latency.</p>"
    )
    headers = ["mechanism", "pattern", "mode", "dtype", "device", "speed-up vs SDPA", "memory vs SDPA", "exponent",
               "eff. length time (SDPA)", "eff. length memory (SDPA)", "eff. length time (naive)",
               "eff. length memory (naive)", "best GFLOP/s"]  # fmt: skip
    return note + table(headers, out)


def memory(rows: list[dict[str, Any]]) -> str:
    cs = curves(rows)
    parts = [
        render(
            Chart(
                _short_title("Peak memory", key),
                "T (keys)",
                "MiB above the inputs",
                _series_of(group, "peak", MIB),
                caption=_caption(key),
            )
        )  # fmt: skip
        for key, group in _by_setting(cs).items()
    ]
    return "\n".join(parts) or '<p class="empty">No memory results.</p>'


def _fidelity_label(r: dict[str, Any]) -> str:
    return r["mechanism"] + "".join(f" {k}={v}" for k, v in sorted(r["options"].items()) if v is not None)


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)] or [[]]


def _group_rank(group: str) -> tuple[int, str]:
    """The kernel family first (the reference point of approximate attention), then the others by name."""
    return (0 if group == FAMILY_GROUPS["kernel"] else 1, group)


def _knob_table(sel: list[dict[str, Any]]) -> str:
    """Mechanism x knob value -> error at the longest T, temperature 1, per input kind; families grouped."""
    t_max = max(r["tokens"] for r in sel)
    inputs = sorted({str(r["extra"].get("inputs")) for r in sel})
    cells: dict[tuple[str, str], dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for r in sorted(sel, key=lambda r: (r["mechanism"], str(sorted(r["options"].items())))):
        if r["tokens"] != t_max or r["extra"].get("temperature") != 1.0:
            continue
        knob = ", ".join(f"{k}={v}" for k, v in sorted(r["options"].items()) if v is not None) or "—"
        cells[(_group_of_name(r["mechanism"]), r["mechanism"])][str(r["extra"].get("inputs"))].append(
            f"{knob}: {_num(r['error'])}"
        )
    rows = [
        [group, mech, *("; ".join(cells[(group, mech)][i]) or "—" for i in inputs)]
        for group, mech in sorted(cells, key=lambda gm: (_group_rank(gm[0]), gm[1]))
    ]
    return f"<p>Error at T = {t_max}, temperature 1, for each value of the mechanism's knob:</p>" + table(
        ["family", "mechanism", *(f"{i} inputs" for i in inputs)], rows, cls="fidelity"
    )


def _at_default_knob(fid: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of each mechanism at its default knob value (all its rows where none is at the default): the
    charts draw one line a mechanism, the knob table shows the other values."""
    defaults: dict[str, dict[str, Any]] = {}
    for name in {r["mechanism"] for r in fid}:
        try:
            options = info(name).options
            defaults[name] = {f.name: f.default for f in dataclasses.fields(options)}
        except (AttnkitError, TypeError):  # not in this attnkit, or options that are not a dataclass
            defaults[name] = {}

    def at_default(r: dict[str, Any]) -> bool:
        d = defaults[r["mechanism"]]
        return all(k in d and d[k] == v for k, v in r["options"].items() if v is not None)

    keep = {r["mechanism"] for r in fid if at_default(r)}
    return [r for r in fid if r["mechanism"] not in keep or at_default(r)]


def fidelity(rows: list[dict[str, Any]]) -> str:
    """Per pattern: the knob table, then error vs T and vs temperature at each mechanism's default knob, one
    chart per family group (the kernel family first, the sparse, low-rank and routed families beside it)."""
    fid = [r for r in rows if r["kind"] == "fidelity" and r["status"] == "ok"]
    if not fid:
        return '<p class="empty">No fidelity results in this store: run <code>attnkit bench fidelity</code>.</p>'
    parts = []
    drawn = _at_default_knob(fid)
    for pattern in sorted({r["pattern"] for r in fid}):
        parts.append(f"<h3>{escape(pattern)}</h3>" + _knob_table([r for r in fid if r["pattern"] == pattern]))
        for inputs in sorted({str(r["extra"].get("inputs")) for r in fid}):
            sel = [r for r in drawn if r["pattern"] == pattern and str(r["extra"].get("inputs")) == inputs]
            if not sel:
                continue
            t_max = max(r["tokens"] for r in sel)
            by_group: dict[str, dict[str, dict[str, list]]] = defaultdict(
                lambda: {"t": defaultdict(list), "tau": defaultdict(list)}
            )
            for r in sel:
                lines = by_group[_group_of_name(r["mechanism"])]
                if r["extra"].get("temperature") == 1.0:
                    lines["t"][_fidelity_label(r)].append((r["tokens"], r["error"]))
                if r["tokens"] == t_max:
                    lines["tau"][_fidelity_label(r)].append((r["extra"].get("temperature"), r["error"]))
            for group in sorted(by_group, key=_group_rank):
                for what, x_label, caption in (
                    ("t", "T", f"{pattern}, {inputs} inputs, temperature 1"),
                    ("tau", "temperature (scales q)", f"{pattern}, {inputs} inputs, T = {t_max}"),
                ):
                    lines = by_group[group][what]
                    labels = _chunks(sorted(lines), MAX_LINES)
                    for n, chunk in enumerate(labels):
                        part = f" ({n + 1}/{len(labels)})" if len(labels) > 1 else ""
                        title = f"Error vs {'T' if what == 't' else 'temperature'}: {group}{part}, {pattern}, {inputs}"
                        chart = Chart(title, x_label, "relative error", [Series(k, lines[k]) for k in chunk],
                                      caption=caption)  # fmt: skip
                        parts.append(render(chart))
    return "\n".join(parts)


def decode(rows: list[dict[str, Any]]) -> str:
    dec = [r for r in rows if r["kind"] == "decode" and r["status"] == "ok"]
    if not dec:
        return '<p class="empty">No decoding results in this store (mode <code>decode</code>).</p>'
    lat: dict[str, list] = defaultdict(list)
    mem: dict[str, list] = defaultdict(list)
    doubt: dict[str, set] = defaultdict(set)
    for r in dec:
        label = f"{r['mechanism']}/{r['path']}"
        lat[label].append((r["tokens"], r["median_ms"]))
        mem[label].append((r["tokens"], (r["state_bytes"] or 0) / MIB))
        if r.get("doubtful"):
            doubt[label].add(r["tokens"])
    settings = sorted({f"{r['dtype']}, {run_setting(r)}" for r in dec})
    parts = []
    for n, labels in enumerate(_chunks(sorted(lat, key=lambda k: max(v for _, v in lat[k])), MAX_LINES)):
        part = f" ({n + 1})" if len(lat) > MAX_LINES else ""
        caption = "; ".join(settings)
        parts.append(
            render(
                Chart(
                    f"Decoding: ms per token{part}",
                    "context T",
                    "ms per token",
                    [Series(k, lat[k], doubtful=doubt[k]) for k in labels],
                    caption=caption,
                )
            )
        )
        parts.append(render(Chart(f"Decoding state size{part}", "context T", "state MiB (batch 1, all heads)",
                                  [Series(k, mem[k]) for k in labels], caption=caption)))  # fmt: skip
    return "\n".join(parts)


def peers(rows: list[dict[str, Any]]) -> str:
    cs = curves(rows)
    peer_curves = [c for c in cs if c.peer]
    if not peer_curves:
        return (
            '<p class="empty">No peer results in this store: install <code>attnkit[peers]</code> and run'
            " <code>attnkit bench speed --peers</code>.</p>"
        )
    out = []
    for p in peer_curves:
        ours = [c for c in cs if not c.peer and c.mechanism == p.mechanism and c.where == p.where]
        base = baseline_of(p, cs)
        for t in p.lengths:
            pm = p.at(t, "ms")
            base_ms = base.at(t, "ms") if base else None
            ratio = p.at(t, "speedup") or (base_ms / pm if base_ms and pm else None)
            vs_sdpa = Html(escape(_num(ratio, "{:.2f}×")) + doubt_mark(p.at(t, "doubtful")))
            for c in ours:
                cm = c.at(t, "ms")
                if cm and pm:
                    out.append([p.peer, c.label, p.pattern, p.mode, t, f"{pm:.2f}", f"{cm:.2f}", f"{pm / cm:.2f}×",
                                vs_sdpa])  # fmt: skip
            if not ours:
                out.append([p.peer, "—", p.pattern, p.mode, t, f"{pm:.2f}", "—", "—", vs_sdpa])
    return "<p>attnkit/peer &gt; 1 means attnkit is faster (peer ms / attnkit ms), same inputs, same run.</p>" + table(
        ["peer", "attnkit", "pattern", "mode", "T", "peer ms", "attnkit ms", "attnkit speed-up", "peer vs SDPA"], out
    )


def problems(rows: list[dict[str, Any]]) -> str:
    bad = [r for r in rows if r["status"] != "ok"]
    out = [[r["kind"], f"{r['mechanism']}/{r.get('path') or ''}", r.get("pattern"), r.get("mode"), r.get("tokens"),
            r.get("dtype"), r["status"], r.get("reason")] for r in bad]  # fmt: skip
    doubtful = [r for r in rows if r["status"] == "ok" and r.get("doubtful")]
    shaky = [[r["kind"], f"{r['mechanism']}/{r.get('path') or ''}", r.get("pattern"), r.get("mode"), r.get("tokens"),
              r.get("dtype"), r.get("doubtful")] for r in doubtful]  # fmt: skip
    return (
        table(["kind", "mechanism", "pattern", "mode", "T", "dtype", "status", "reason"], out)
        + f"<h3>Doubtful figures ({len(doubtful)})</h3>"
        + table(["kind", "mechanism", "pattern", "mode", "T", "dtype", "why"], shaky)
    )
