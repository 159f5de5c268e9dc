"""Derived figures: CAB's efficiency length, scaling exponents, speed-ups."""

from __future__ import annotations

import math

import pytest

from attnkit.bench.derived import baseline_of, curves, efficiency_length, scaling_exponent, summarise

# CAB's own data (scripts/efficiency_length/cost.xlsx): vanilla vs ABC, batch 4, d 512, 8 heads
N = [256, 512, 1024, 2048, 4096, 8192]
VANILLA_MS = [0.472, 0.628, 0.721, 0.981, 3.67, 18.437]
ABC_MS = [0.648, 0.590, 0.602, 0.910, 1.006, 1.509]
VANILLA_MIB = [81, 265, 952, 3604, 14020, 55300]
ABC_MIB = [42, 80, 156, 308, 612, 1220]


def test_reproduces_cab_abc_efficiency_lengths():
    """CAB's README: ABC's efficiency length is 1,877 for time and 70 for memory."""
    assert round(efficiency_length(N, VANILLA_MS, ABC_MS, drop_first=True)) == 1877
    assert round(efficiency_length(N, VANILLA_MIB, ABC_MIB, drop_first=False)) == 70


def test_efficiency_length_edge_cases():
    quad = [t * t / 1e4 + 5 for t in N]
    assert efficiency_length(N, quad, [0.001 * t for t in N], drop_first=False) == 0.0  # always cheaper
    assert efficiency_length(N, [1.0] * 6, [100.0 + t for t in N], drop_first=False) == math.inf  # never
    assert efficiency_length(N[:2], VANILLA_MS[:2], ABC_MS[:2], drop_first=True) is None  # too few points
    # a baseline fit that bends down (noise) crosses the mechanism where it turns *more* expensive:
    # that root is no efficiency length (the mechanism is dearer at the longest length: never)
    t3 = [256, 1024, 4096]
    assert efficiency_length(t3, [1.0, 3.0, 4.0], [0.5, 2.0, 8.0], drop_first=False) == math.inf


def test_scaling_exponent():
    assert scaling_exponent(N, [t**2 * 1e-3 for t in N]) == pytest.approx(2.0)
    assert scaling_exponent(N, [t * 3.0 for t in N]) == pytest.approx(1.0)
    assert scaling_exponent([256], [1.0]) is None


def _row(mech, path, t, ms, peak):
    return {
        "kind": "speed",
        "status": "ok",
        "mechanism": mech,
        "path": path,
        "pattern": "causal_self",
        "mode": "fwd",
        "dtype": "float32",
        "device": "cpu",
        "tokens": t,
        "median_ms": ms,
        "peak_bytes": peak,
        "gflops": 1.0,
        "extra": {},
    }


def test_summarise_against_the_sdpa_curve():
    rows = [_row("softmax", "sdpa", t, t * t / 1e5, 1000 * t) for t in N]
    rows += [_row("linear", "chunk", t, t / 100, 500 * t) for t in N]
    rows.append({**_row("linear", "chunk", 99, 1, 1), "status": "error"})  # failed rows are ignored
    cs = curves(rows)
    lin = next(c for c in cs if c.mechanism == "linear")
    s = summarise(lin, baseline_of(lin, cs))
    assert s.speedup[8192] == pytest.approx((8192**2 / 1e5) / 81.92)
    assert s.memory_ratio[256] == pytest.approx(0.5)
    assert s.exponent == pytest.approx(1.0)
    assert 0 < s.efficiency_time < 8192


def test_curves_keep_thread_counts_and_options_apart():
    """Rows measured with other threads (or options) form their own curves, compared with their own baseline."""

    def at(threads, **extra):
        return lambda mech, path, t, ms: {**_row(mech, path, t, ms, 1), "threads": threads, **extra}

    one, four = at(1), at(4)
    rows = [one("softmax", "sdpa", t, 8.0) for t in N] + [four("softmax", "sdpa", t, 2.0) for t in N]
    rows += [one("linear", "chunk", t, 1.0) for t in N] + [four("linear", "chunk", t, 1.0) for t in N]
    rows += [{**one("linear", "chunk", t, 4.0), "options": {"eps": 0.1}} for t in N]
    cs = curves(rows)
    lins = [c for c in cs if c.mechanism == "linear"]
    assert len(lins) == 3 and len({c.label for c in lins}) == 2  # options shown only where they differ
    assert {c.options for c in lins} == {"", "eps=0.1"}
    speedups = sorted(summarise(c, baseline_of(c, cs)).speedup[1024] for c in lins)
    assert speedups == pytest.approx([2.0, 2.0, 8.0])  # eps=0.1 at 1 thread, plain at 4 threads, plain at 1
    # the same T measured twice under one setting: the newest row counts
    again = rows + [{**one("linear", "chunk", 1024, 0.5), "created_at": 10.0}]
    newest = next(c for c in curves(again) if c.mechanism == "linear" and not c.options and "1 threads" in c.setting)
    assert newest.at(1024, "ms") == 0.5 and newest.lengths == sorted(N)
