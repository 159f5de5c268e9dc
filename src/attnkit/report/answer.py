"""The report's first section: the answer a reader came for, per pattern and length.

For each pattern and each of T = 1K, 4K, 16K that the store measured (else its longest T): the
fastest exact mechanism (the same output as full softmax, to 1e-3) and the fastest overall, each with
its paired speed-up over SDPA and its fidelity error, forward pass, one dtype and setting.
"""

from __future__ import annotations

import dataclasses
from html import escape
from typing import Any

from ..api import info
from ..bench.derived import SDPA, Curve, baseline_of, curves, paired_speedup
from ..errors import AttnkitError
from .sections import Html, doubt_mark, table

ANSWER_LENGTHS = (1024, 4096, 16384)
EXACT_ERROR = 1e-3  # relative error vs softmax below which a mechanism counts as exact at that T


def _fidelity(rows: list[dict[str, Any]], curve: Curve, t: int) -> tuple[float | None, int | None]:
    """The mechanism's error vs softmax (random inputs, temperature 1, the speed curve's option values)
    at ``t``, or at the longest measured length below it; (error, the T it was measured at)."""
    if (curve.mechanism, curve.path) == SDPA or curve.mechanism == "softmax":
        return 0.0, t
    options = _defaults(curve.mechanism) | (
        dict(kv.split("=", 1) for kv in curve.options.split(", ")) if curve.options else {}
    )
    best: tuple[float | None, int | None] = (None, None)
    for r in rows:
        if (r["kind"], r["mechanism"], r["pattern"]) != ("fidelity", curve.mechanism, curve.pattern):
            continue
        extra = r.get("extra") or {}
        if extra.get("temperature") != 1.0 or extra.get("inputs") != "random" or r["tokens"] > t:
            continue
        knob = {k: v for k, v in (r.get("options") or {}).items() if v is not None}
        if any(str(v) != options.get(k) for k, v in knob.items()):
            continue  # measured at another value of the mechanism's knob than the speed curve used
        if best[1] is None or r["tokens"] > best[1]:
            best = (r["error"], r["tokens"])
    return best


def _defaults(mechanism: str) -> dict[str, str]:
    """The mechanism's default option values, as text (what a speed curve without options ran with)."""
    try:
        opts = info(mechanism).options
    except AttnkitError:
        return {}
    return {f.name: str(f.default) for f in dataclasses.fields(opts) if f.default is not dataclasses.MISSING}


def _is_exact(curve: Curve, error: float | None, error_t: int | None, t: int) -> bool:
    if curve.mechanism == "softmax":
        return True
    try:
        declared = info(curve.mechanism).exact
    except AttnkitError:
        return False
    return declared and error is not None and error_t == t and error <= EXACT_ERROR


def _entry(rows, curve: Curve, base: Curve, t: int) -> tuple[float, Html]:
    speed = paired_speedup(curve, base, t)
    error, error_t = _fidelity(rows, curve, t)
    err_text = "—" if error is None else f"{error:.2g}" + ("" if error_t == t else f" (at T={error_t})")
    text = f"<b>{escape(curve.label)}</b> {speed:.2f}×{doubt_mark(curve.at(t, 'doubtful'))}, error {escape(err_text)}"
    return speed, Html(text)


def _setting_of(cs: list[Curve]) -> tuple[str, str, str] | None:
    """The (dtype, device, setting) with the most forward curves: one comparable set of figures."""
    counts: dict[tuple[str, str, str], int] = {}
    for c in cs:
        if c.mode == "fwd" and not c.peer:
            key = (c.dtype, c.device, c.setting)
            counts[key] = counts.get(key, 0) + 1
    return max(counts, key=lambda k: (k[0] == "float32", counts[k])) if counts else None


def answer(rows: list[dict[str, Any]]) -> str:
    cs = curves(rows, kinds=("speed",))
    setting = _setting_of(cs)
    if setting is None:
        return '<p class="empty">No speed results in this store: run <code>attnkit bench speed</code>.</p>'
    dtype, device, run = setting
    chosen = [c for c in cs if c.mode == "fwd" and (c.dtype, c.device, c.setting) == setting]
    out = []
    for pattern in sorted({c.pattern for c in chosen}):
        group = [c for c in chosen if c.pattern == pattern]
        base = next((c for c in group if (c.mechanism, c.path) == SDPA and not c.options), None)
        if base is None:
            continue
        lengths = [t for t in ANSWER_LENGTHS if t in base.lengths] or [max(base.lengths)]
        for t in lengths:
            entries = []
            for c in group:
                if t in c.lengths and baseline_of(c, cs) is not None and paired_speedup(c, base, t):
                    speed, text = _entry(rows, c, base, t)
                    error, error_t = _fidelity(rows, c, t)
                    entries.append((speed, text, _is_exact(c, error, error_t, t)))
            if not entries:
                continue
            exact = max((e for e in entries if e[2]), key=lambda e: e[0], default=None)
            fastest = max(entries, key=lambda e: e[0])
            out.append([pattern, t, f"{base.at(t, 'ms'):.3g}", exact[1] if exact else "—", fastest[1]])
    intro = (
        f"<p>Forward pass, {escape(dtype)} on {escape(device)} ({escape(run)}). Speed-up: SDPA softmax's time over"
        " the mechanism's, timed interleaved in the same process (&gt; 1: faster). Error: relative distance of"
        f" the output from exact softmax (random inputs); <i>exact</i> means within {EXACT_ERROR:g} at that T."
        ' <span class="doubt">?</span>: a doubtful figure (the machine was busy or the timings spread).</p>'
    )
    headers = ["pattern", "T", "SDPA ms", "fastest exact", "fastest overall"]
    return intro + table(headers, out, cls="answer")
