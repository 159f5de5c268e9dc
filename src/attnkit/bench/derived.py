"""Figures derived from stored rows (pure functions: rows in, numbers out; nothing is re-measured).

- speed-up against SDPA softmax at each T: the paired ratio each row measured against SDPA in its
  own worker (rows of stores older than pairing: the ratio of the two curves' medians), and the
  memory ratio;
- the log-log scaling exponent of a curve;
- CAB's efficiency length (Comprehensive Attention Benchmarking, ICML 2023, ``scripts/efficiency_length``):
  fit the baseline's cost with a quadratic in N and the mechanism's with a line (for time, without
  the smallest N), and take the larger root of their difference: the length from which the
  mechanism is cheaper.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

SDPA = ("softmax", "sdpa")
NAIVE = ("softmax", "reference")


def efficiency_length(
    lengths: list[float], baseline: list[float], mechanism: list[float], *, drop_first: bool
) -> float | None:
    """CAB's efficiency length: where the mechanism's linear fit crosses the baseline's quadratic fit.

    Returns the larger real root of ``a N^2 + (b - d) N + (c - e) = 0`` (baseline ``a N^2 + b N + c``,
    mechanism ``d N + e``) at which the mechanism turns cheaper (the difference rises through 0);
    ``0.0`` when the mechanism is cheaper at every length the fits cover and ``inf`` when it never
    becomes cheaper, or only beyond 100x the longest length measured (a crossing that far out is an
    artefact of extrapolating the fits); None with fewer than three points.
    """
    n = np.asarray(lengths, dtype=float)
    if len(n) < 3:
        return None
    a, b, c = np.polyfit(n, np.asarray(baseline, float), 2)
    n_lin, m = (n[1:], np.asarray(mechanism, float)[1:]) if drop_first else (n, np.asarray(mechanism, float))
    d, e = np.polyfit(n_lin, m, 1)
    roots = np.roots([a, b - d, c - e])
    real = [r.real for r in roots if abs(r.imag) < 1e-9 * max(1.0, abs(r.real))]
    # a crossing counts only where the gap (baseline - mechanism) rises through 0: the mechanism turns
    # cheaper there. A baseline fit that bends down (a < 0, noisy data) also crosses the other way.
    rising = sorted(r for r in real if r > 0 and 2 * a * r + (b - d) > 0)
    if rising:
        return float(rising[-1]) if rising[-1] <= 100 * n.max() else math.inf
    # no positive crossing: which side of the baseline is the mechanism at the lengths measured?
    gap = (a * n**2 + b * n + c) - (d * n + e)
    return 0.0 if np.all(gap > 0) else math.inf


def scaling_exponent(lengths: list[float], values: list[float]) -> float | None:
    """Slope of log(value) against log(T): ~1 linear, ~2 quadratic. None with fewer than 2 points."""
    pts = [(t, v) for t, v in zip(lengths, values, strict=True) if v and v > 0]
    if len(pts) < 2:
        return None
    x = np.log([p[0] for p in pts])
    y = np.log([p[1] for p in pts])
    return float(np.polyfit(x, y, 1)[0])


@dataclass
class Curve:
    """One series of speed rows: a mechanism/path (with its options) on a pattern, mode, dtype, device
    and run setting (threads and input shape: rows measured under other settings are other curves)."""

    mechanism: str
    path: str
    pattern: str
    mode: str
    dtype: str
    device: str
    peer: str | None
    lengths: list[int]
    ms: list[float | None]
    peak: list[float | None]
    gflops: list[float | None]
    setting: str = ""  # threads and shape, e.g. "2 threads, B=1 H=8/8 D=64"
    options: str = ""  # the mechanism's options, "window=256" ("" for none)
    show_options: bool = False  # in the label: the store has this mechanism/path with other options too
    speedup: list[float | None] = field(default_factory=list)  # paired with SDPA in the same worker
    baseline_ms: list[float | None] = field(default_factory=list)  # that SDPA's median
    doubtful: list[str | None] = field(default_factory=list)  # why a point is not to be trusted (None: it is)

    @property
    def label(self) -> str:
        if (self.mechanism, self.path) == SDPA:
            return "SDPA softmax"
        if (self.mechanism, self.path) == NAIVE:
            return "naive softmax"
        if self.peer:
            return f"{self.peer} (peer)"
        return f"{self.mechanism}/{self.path}" + (f" {self.options}" if self.show_options and self.options else "")

    @property
    def where(self) -> tuple[str, str, str, str, str]:
        """What a baseline must share to compare with this curve."""
        return (self.pattern, self.mode, self.dtype, self.device, self.setting)

    def at(self, t: int, name: str) -> float | None:
        values = getattr(self, name)
        return values[self.lengths.index(t)] if t in self.lengths and values else None


def run_setting(row: dict[str, Any]) -> str:
    """The threads and input shape a row was measured with, as text (one curve never mixes two)."""
    heads = f"{row.get('heads')}/{row.get('kv_heads')}" if row.get("kv_heads") != row.get("heads") else row.get("heads")
    return f"{row.get('threads')} threads, B={row.get('batch')} H={heads} D={row.get('head_dim')}"


def curves(rows: list[dict[str, Any]], kinds: tuple[str, ...] = ("speed", "peer")) -> list[Curve]:
    """Group ok speed rows into curves, each sorted by T (the newest row where a T was measured twice)."""
    groups: dict[tuple, dict[int, dict]] = defaultdict(dict)
    for r in sorted(rows, key=lambda r: r.get("created_at") or 0):
        if r["kind"] in kinds and r["status"] == "ok":
            peer = (r.get("extra") or {}).get("peer")
            options = ", ".join(f"{k}={v}" for k, v in sorted((r.get("options") or {}).items()))
            key = (r["mechanism"], r["path"], r["pattern"], r["mode"], r["dtype"], r["device"], peer,
                   run_setting(r), options)  # fmt: skip
            groups[key][r["tokens"]] = r
    out = []
    for key, by_t in sorted(groups.items(), key=lambda kv: str(kv[0])):
        mech, path, pattern, mode, dtype, device, peer, setting, options = key
        rs = [by_t[t] for t in sorted(by_t)]
        out.append(
            Curve(
                mech,
                path,
                pattern,
                mode,
                dtype,
                device,
                peer,
                [r["tokens"] for r in rs],
                [r["median_ms"] for r in rs],
                [r["peak_bytes"] for r in rs],
                [r["gflops"] for r in rs],
                setting,
                options,
                speedup=[r.get("speedup") for r in rs],
                baseline_ms=[r.get("baseline_ms") for r in rs],
                doubtful=[r.get("doubtful") for r in rs],
            )
        )
    variants = Counter((c.mechanism, c.path, c.peer, c.where) for c in out)
    for c in out:
        c.show_options = variants[(c.mechanism, c.path, c.peer, c.where)] > 1
    return out


def baseline_of(curve: Curve, all_curves: list[Curve], which: tuple[str, str] = SDPA) -> Curve | None:
    for c in all_curves:
        if (c.mechanism, c.path) == which and not c.options and c.where == curve.where:
            return c
    return None


@dataclass(frozen=True)
class Summary:
    """Derived figures of one curve against a baseline."""

    curve: Curve
    speedup: dict[int, float]  # baseline ms / mechanism ms at each common T
    memory_ratio: dict[int, float]  # mechanism peak / baseline peak
    exponent: float | None  # of the mechanism's latency
    efficiency_time: float | None
    efficiency_memory: float | None


def paired_speedup(curve: Curve, base: Curve | None, t: int) -> float | None:
    """SDPA time / this curve's time at T: the row's own paired ratio, else the ratio of the two medians."""
    paired = curve.at(t, "speedup")
    if paired:
        return paired
    ms, base_ms = curve.at(t, "ms"), base.at(t, "ms") if base else None
    return base_ms / ms if ms and base_ms else None


def summarise(curve: Curve, base: Curve) -> Summary:
    common = [t for t in curve.lengths if t in base.lengths]
    speedup = {t: s for t in curve.lengths if (s := paired_speedup(curve, base, t))}
    memory = {t: curve.at(t, "peak") / base.at(t, "peak") for t in common if base.at(t, "peak")}
    # the baseline's time as timed beside the mechanism where it was (paired), else from its own curve
    ms_pairs = [(t, curve.at(t, "baseline_ms") or base.at(t, "ms"), curve.at(t, "ms")) for t in common]
    mem_pairs = [(t, base.at(t, "peak"), curve.at(t, "peak")) for t in common]

    def length(pairs, drop_first):
        pairs = [p for p in pairs if p[1] is not None and p[2] is not None]
        if len(pairs) < 3:
            return None
        return efficiency_length(
            [p[0] for p in pairs], [p[1] for p in pairs], [p[2] for p in pairs], drop_first=drop_first
        )

    return Summary(
        curve=curve,
        speedup=speedup,
        memory_ratio=memory,
        exponent=scaling_exponent(curve.lengths, curve.ms),
        efficiency_time=length(ms_pairs, drop_first=True),
        efficiency_memory=length(mem_pairs, drop_first=False),
    )
