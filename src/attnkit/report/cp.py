"""The report's context-parallelism section (``attnkit bench cp`` rows, ``kind = "cp"``): memory per rank against
W, the largest T each W held, and the bytes each rank sent per step, measured against the strategy's formula."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from .charts import Chart, Series, render
from .sections import MIB, _num, table

Rows = list[dict[str, Any]]


def _series_key(r: dict[str, Any]) -> tuple:
    x = r.get("extra") or {}
    return (r["mechanism"], x.get("ran") or r.get("path"), r["pattern"], x.get("layout"), r["dtype"])


def _label(key: tuple) -> str:
    mechanism, strategy, pattern, layout, dtype = key
    return f"{mechanism}/{strategy} {pattern} {layout} {dtype}"


def _memory_chart(ok: Rows) -> str:
    """Peak memory of the largest rank vs T, one line per W, a chart per mechanism/strategy."""
    by_key: dict[tuple, dict[int, list]] = defaultdict(lambda: defaultdict(list))
    for r in ok:
        by_key[_series_key(r)][r["extra"]["world"]].append((r["tokens"], r["peak_bytes"] / MIB))
    charts = []
    for key, by_w in sorted(by_key.items(), key=lambda kv: str(kv[0])):
        series = [Series(f"W={w}", pts) for w, pts in sorted(by_w.items())]
        charts.append(render(Chart(f"Memory per rank: {key[0]}/{key[1]}", "T (tokens)", "MiB per rank (peak)",
                                   series, caption=_label(key) + "; the largest rank's step peak")))  # fmt: skip
    return "\n".join(charts)


def _held(rows: Rows) -> str:
    """Per series and W: the largest T that ran, and the first that did not (with why)."""
    by: dict[tuple, list] = defaultdict(list)
    for r in rows:
        by[(*_series_key(r), r["extra"].get("world"))].append(r)
    out = []
    for key, rs in sorted(by.items(), key=lambda kv: str(kv[0])):
        ok = [r["tokens"] for r in rs if r["status"] == "ok"]
        bad = sorted((r for r in rs if r["status"] in ("oom", "error")), key=lambda r: r["tokens"])
        best = max(ok) if ok else None
        peak = next((r["peak_bytes"] for r in rs if r["tokens"] == best and r["status"] == "ok"), None)
        first_bad = f"T={bad[0]['tokens']}: {bad[0]['status']} ({(bad[0].get('reason') or '')[:80]})" if bad else ""
        out.append([_label(key[:5]), key[5], best, _num(peak / MIB if peak else None), first_bad])
    return table(["series", "W", "largest T held", "MiB per rank there", "first T that failed"], out)


def _bytes(ok: Rows) -> str:
    """Bytes sent by one rank per step, measured and by formula, with time and error."""
    out = []
    for r in sorted(ok, key=lambda r: (str(_series_key(r)), r["extra"]["world"], r["tokens"])):
        x = r["extra"]
        measured = (x.get("bytes_fwd") or 0) + (x.get("bytes_bwd") or 0)
        formula = None if x.get("formula_fwd") is None else x["formula_fwd"] + x["formula_bwd"]
        ratio = measured / formula if formula else None
        by_formula = _num(formula / MIB if formula is not None else None)
        out.append([_label(_series_key(r)), x["world"], r["tokens"], _num(r["median_ms"]), _num(measured / MIB),
                    by_formula, _num(ratio), _num(r.get("error"), "{:.1e}")])  # fmt: skip
    return table(["series", "W", "T", "ms per step (slowest rank)", "MiB sent (fwd + bwd)", "MiB by formula",
                  "measured / formula", "max error vs 1 process"], out)  # fmt: skip


def cp(rows: Rows) -> str:
    """The section's HTML (empty when the store holds no cp rows)."""
    mine = [r for r in rows if r["kind"] == "cp"]
    ok = [r for r in mine if r["status"] == "ok" and (r.get("extra") or {}).get("world")]
    if not mine:
        return '<p class="empty">No context-parallel results (attnkit bench cp).</p>'
    return (
        _memory_chart(ok)
        + '<p class="note">The largest T each W held (one sequence split over W gloo processes):</p>'
        + _held(mine)
        + '<p class="note">Bytes one rank sends per forward + backward step (payload tensors; the size check and'
        " masks are not counted), measured by wrapping the collectives, against the strategy's formula:</p>"
        + _bytes(ok)
    )
