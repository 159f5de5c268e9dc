"""The report's sections: each turns stored rows into HTML (charts and tables), computing nothing new
beyond the derived figures of ``attnkit.bench.derived``."""

from __future__ import annotations

import math
import time
from collections import defaultdict
from html import escape
from typing import Any

from ..api import info
from ..bench.derived import NAIVE, SDPA, Curve, baseline_of, curves, run_setting, summarise
from ..errors import AttnkitError
from .svg import Chart, Series, render

MIB = 2**20


def table(headers: list[str], rows: list[list[Any]], cls: str = "") -> str:
    if not rows:
        return '<p class="empty">nothing to show.</p>'
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _num(v: float | None, fmt: str = "{:.3g}") -> str:
    if v is None:
        return "—"
    if math.isinf(v):
        return "never"
    return fmt.format(v)


def _series_of(cs: list[Curve], field: str, scale: float = 1.0) -> list[Series]:
    out = []
    for c in cs:
        pts = [(t, v / scale) for t, v in zip(c.lengths, getattr(c, field), strict=True) if v is not None]
        out.append(Series(c.label, pts, dashed=(c.mechanism, c.path) in (SDPA, NAIVE)))
    return out


# Curves are drawn in groups of related mechanisms (each chart also gets the softmax baselines), so
# that a catalogue of dozens of mechanisms stays readable.
FAMILY_GROUPS = {
    "kernel": "kernel (linear) attention",
    "decay": "decay and recurrent",
    "recurrent softmax": "decay and recurrent",
    "hybrid": "decay and recurrent",
}
OTHER_GROUP = "softmax variants, sparse and routed"


def _group_of(curve: Curve) -> str:
    try:
        family = info(curve.mechanism).family
    except AttnkitError:  # a peer's counterpart that attnkit does not have (yet)
        return "peers"
    return FAMILY_GROUPS.get(family, OTHER_GROUP)


def _by_setting(all_curves: list[Curve], mode: str | None = None) -> dict[tuple, list[Curve]]:
    """(pattern, mode, dtype, device, setting, group) -> its curves, the SDPA and naive baselines in every group."""
    settings: dict[tuple, list[Curve]] = defaultdict(list)
    for c in all_curves:
        if mode is None or c.mode == mode:
            settings[c.where].append(c)
    groups: dict[tuple, list[Curve]] = {}
    for key, cs in settings.items():
        baselines = [c for c in cs if not c.peer and (c.mechanism, c.path) in (SDPA, NAIVE)]
        names = sorted({_group_of(c) for c in cs if c not in baselines}) or [OTHER_GROUP]
        for name in names:
            groups[(*key, name)] = [c for c in cs if c not in baselines and _group_of(c) == name] + baselines
    return dict(sorted(groups.items()))


def _setting_title(key: tuple) -> str:
    pattern, mode, dtype, _device, setting, group = key
    return f"{group}: {pattern}, {'forward' if mode == 'fwd' else 'forward + backward'}, {dtype} ({setting})"


def machine(runs: list[dict[str, Any]], db: str) -> str:
    rows = []
    for r in runs:
        started = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["started_at"]))
        peak = f"{r['matmul_gflops']:.0f} ({r['matmul_dtype']})" if r.get("matmul_gflops") else "—"
        rows.append(
            [
                escape(r["run_id"]),
                started,
                escape(r["status"]),
                escape(r.get("device") or "?"),
                escape(r.get("torch_version") or "?"),
                escape(r.get("python") or "?"),
                r.get("threads") or "?",
                escape(r.get("git_rev") or "?"),
                peak,
                escape(r.get("command") or ""),
            ]
        )
    return f"<p>Store: <code>{escape(db)}</code>. Every figure below is read from it.</p>" + table(
        ["run", "started", "status", "device", "torch", "python", "threads", "git", "matmul GFLOP/s", "command"], rows
    )


def scaling(rows: list[dict[str, Any]]) -> str:
    cs = curves(rows)
    if not cs:
        return '<p class="empty">No speed results in this store: run <code>attnkit bench speed</code>.</p>'
    parts = []
    for key, group in _by_setting(cs).items():
        parts.append(
            render(Chart(f"Latency: {_setting_title(key)}", "T (keys)", "ms (median)", _series_of(group, "ms")))
        )
    return "\n".join(parts)


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
            series.append(Series(c.label, sorted(s.speedup.items()), dashed=(c.mechanism, c.path) == NAIVE))
        if series:
            parts.append(
                render(
                    Chart(
                        f"Speed-up vs SDPA: {_setting_title(key)}",
                        "T (keys)",
                        "SDPA ms / mechanism ms",
                        series,
                        reference_y=1.0,
                    )
                )
            )
    return "\n".join(parts) or '<p class="empty">No speed results with an SDPA baseline.</p>'


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
        out.append(
            [
                escape(c.label),
                c.pattern,
                c.mode,
                c.dtype,
                c.device,
                _num(s.speedup.get(t_max), "{:.2f}×") + (f" @ {t_max}" if t_max else ""),
                _num(s.memory_ratio.get(t_max), "{:.2f}×"),
                _num(s.exponent, "{:.2f}"),
                _num(s.efficiency_time, "{:,.0f}"),
                _num(s.efficiency_memory, "{:,.0f}"),
                _num(sn.efficiency_time if sn else None, "{:,.0f}"),
                _num(sn.efficiency_memory if sn else None, "{:,.0f}"),
                _num(max((g for g in c.gflops if g), default=None), "{:.1f}"),
            ]
        )
    note = (
        "<p>Efficiency length (CAB): the sequence length from which the mechanism is cheaper than the"
        " baseline, from a quadratic fit of the baseline and a linear fit of the mechanism (time: without"
        " the smallest T). 0 = cheaper at every measured length; never = no crossing. The exponent is the"
        " log-log slope of the mechanism's latency.</p>"
    )
    return note + table(
        [
            "mechanism",
            "pattern",
            "mode",
            "dtype",
            "device",
            "speed-up vs SDPA",
            "memory vs SDPA",
            "exponent",
            "eff. length time (SDPA)",
            "eff. length memory (SDPA)",
            "eff. length time (naive)",
            "eff. length memory (naive)",
            "best GFLOP/s",
        ],
        out,
    )


def memory(rows: list[dict[str, Any]]) -> str:
    cs = curves(rows)
    parts = [
        render(
            Chart(
                f"Peak memory: {_setting_title(key)}",
                "T (keys)",
                "MiB above the inputs",
                _series_of(group, "peak", MIB),
            )
        )
        for key, group in _by_setting(cs).items()
    ]
    return "\n".join(parts) or '<p class="empty">No memory results.</p>'


def fidelity(rows: list[dict[str, Any]]) -> str:
    fid = [r for r in rows if r["kind"] == "fidelity" and r["status"] == "ok"]
    if not fid:
        return '<p class="empty">No fidelity results in this store: run <code>attnkit bench fidelity</code>.</p>'
    parts = []
    for pattern in sorted({r["pattern"] for r in fid}):
        for inputs in sorted({r["extra"].get("inputs") for r in fid}):
            sel = [r for r in fid if r["pattern"] == pattern and r["extra"].get("inputs") == inputs]
            by_t: dict[str, list] = defaultdict(list)
            by_tau: dict[str, list] = defaultdict(list)
            t_max = max(r["tokens"] for r in sel)
            for r in sel:
                label = r["mechanism"] + "".join(f" {k}={v}" for k, v in sorted(r["options"].items()) if v is not None)
                if r["extra"].get("temperature") == 1.0:
                    by_t[label].append((r["tokens"], r["error"]))
                if r["tokens"] == t_max:
                    by_tau[label].append((r["extra"]["temperature"], r["error"]))
            parts.append(
                render(
                    Chart(
                        f"Error vs exact softmax: {pattern}, {inputs} inputs, tau = 1",
                        "T",
                        "relative error",
                        [Series(k, v) for k, v in sorted(by_t.items())],
                    )
                )
            )
            parts.append(
                render(
                    Chart(
                        f"Error vs temperature: {pattern}, {inputs} inputs, T = {t_max}",
                        "temperature tau (scales q)",
                        "relative error",
                        [Series(k, v) for k, v in sorted(by_tau.items())],
                    )
                )
            )
    return "\n".join(parts)


def decode(rows: list[dict[str, Any]]) -> str:
    dec = [r for r in rows if r["kind"] == "decode" and r["status"] == "ok"]
    if not dec:
        return '<p class="empty">No decoding results in this store (mode <code>decode</code>).</p>'
    lat: dict[str, list] = defaultdict(list)
    mem: dict[str, list] = defaultdict(list)
    for r in dec:
        label = f"{r['mechanism']}/{r['path']} {r['dtype']} ({run_setting(r)})"
        lat[label].append((r["tokens"], r["median_ms"]))
        mem[label].append((r["tokens"], r["state_bytes"] / MIB))
    return render(
        Chart(
            "Decoding: one token's latency at context T",
            "context T",
            "ms per token",
            [Series(k, v) for k, v in sorted(lat.items())],
        )
    ) + render(
        Chart(
            "Decoding state size",
            "context T",
            "state MiB (batch 1, all heads)",
            [Series(k, v) for k, v in sorted(mem.items())],
        )
    )


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
            for c in ours:
                cm = c.at(t, "ms")
                if cm and pm:
                    out.append(
                        [
                            escape(p.peer or ""),
                            escape(c.label),
                            p.pattern,
                            p.mode,
                            t,
                            f"{pm:.2f}",
                            f"{cm:.2f}",
                            f"{pm / cm:.2f}×",
                            _num(base.at(t, "ms") / pm if base and base.at(t, "ms") else None, "{:.2f}×"),
                        ]
                    )
            if not ours:
                out.append(
                    [
                        escape(p.peer or ""),
                        "—",
                        p.pattern,
                        p.mode,
                        t,
                        f"{pm:.2f}",
                        "—",
                        "—",
                        _num(base.at(t, "ms") / pm if base and base.at(t, "ms") else None, "{:.2f}×"),
                    ]
                )
    return "<p>attnkit/peer &gt; 1 means attnkit is faster (peer ms / attnkit ms), same inputs, same run.</p>" + table(
        ["peer", "attnkit", "pattern", "mode", "T", "peer ms", "attnkit ms", "attnkit speed-up", "peer vs SDPA"], out
    )


def problems(rows: list[dict[str, Any]]) -> str:
    bad = [r for r in rows if r["status"] != "ok"]
    out = [
        [
            r["kind"],
            escape(f"{r['mechanism']}/{r.get('path') or ''}"),
            r.get("pattern") or "",
            r.get("mode") or "",
            r.get("tokens") or "",
            r.get("dtype") or "",
            r["status"],
            escape(r.get("reason") or ""),
        ]
        for r in bad
    ]
    return table(["kind", "mechanism", "pattern", "mode", "T", "dtype", "status", "reason"], out)
