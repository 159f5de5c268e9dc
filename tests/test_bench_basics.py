"""Timing and memory probes used by the benchmark."""

from __future__ import annotations

import time

import pytest
import torch

from attnkit.bench.cases import Case
from attnkit.bench.memory import call_peak_bytes
from attnkit.bench.runner import Budget, run_worker
from attnkit.bench.timing import time_call, time_paired, warmups


def test_time_call_reports_median_spread_and_runs():
    calls = []
    t = time_call(lambda: calls.append(1), threads=1, budget_s=0.05, min_rounds=3)
    # the first Timer.timeit(1) warms up (3 calls); each block of fast calls warms up too
    per_block = t.runs // t.rounds
    assert t.rounds >= 3 and len(calls) == 3 + t.rounds * (per_block + warmups(per_block, 1e-6))
    assert 0 < t.min_ms <= t.median_ms and t.iqr_ms >= 0


@pytest.mark.parametrize(("sleep_s", "warm"), [(0.03, 1), (0.3, 0)])
def test_slow_calls_get_at_most_one_warm_up_call_a_block(sleep_s, warm):
    """Timer.timeit's two warm-up calls a block would triple a slow case's cost; one (or none) will do."""
    calls = []

    def slow():
        calls.append(1)
        time.sleep(sleep_s)  # longer than a block: one call a block

    t = time_call(slow, threads=1, budget_s=0.0, min_rounds=3)
    assert t.runs == t.rounds == 3 and len(calls) == 3 + 3 * (1 + warm)
    assert 0.8 * sleep_s * 1e3 < t.median_ms < 3 * sleep_s * 1e3


def test_paired_timing_interleaves_and_measures_the_ratio():
    """Subject and baseline alternate block by block; the paired ratio tracks the true cost ratio."""
    order = []
    a = torch.randn(256, 256)

    def subject():
        order.append("a")
        return a @ a

    def baseline():
        order.append("b")
        return (a @ a) @ a @ a  # three matmuls: about 3x the subject

    p = time_paired(subject, baseline, threads=1, budget_s=0.5, min_rounds=4)
    assert p.baseline is not None and p.subject.rounds == p.baseline.rounds >= 4
    assert 1.5 < p.speedup < 6, p
    runs = [k for i, k in enumerate(order) if i == 0 or order[i - 1] != k]  # blocks, as a sequence
    assert runs[:2] == ["a", "b"] and len(runs) >= 6  # a, b, (b a merged) ...: never all a then all b


def test_time_paired_stops_at_the_call_limit():
    calls = []
    p = time_paired(lambda: calls.append(1), threads=1, budget_s=10, min_rounds=50, max_calls=40)
    assert len(calls) <= 40 and p.subject.rounds >= 1


QUICK = Budget(time_s=30, timing_s=0.1)


def test_call_peak_bytes_sees_an_allocation():
    def allocate():
        x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        return x.sum()

    peak = call_peak_bytes(allocate)
    assert 60 * 2**20 < peak < 100 * 2**20


def test_sweep_worker_memory_is_not_fooled_by_a_big_parent():
    """The sweep's own worker process: the parent's (or forkserver's) peak must not hide the case's."""
    ballast = torch.ones(300 * 2**20 // 4)
    small = run_worker(Case("speed", "softmax", "sdpa", "noncausal_self", "fwd", 256, heads=2, kv_heads=2,
                            head_dim=16, runs=1), threads=1, timeout_s=120, budget=QUICK)  # fmt: skip
    big = run_worker(Case("speed", "sliding_window", "blocked", "causal_self", "fwdbwd", 4096, options={"window": 64},
                          runs=1), threads=1, timeout_s=300, budget=QUICK)  # fmt: skip
    assert small["status"] == big["status"] == "ok", (small, big)
    assert big["path"] == "blocked" and big["peak_bytes"] > 10 * 2**20 and big["peak_bytes"] > 4 * small["peak_bytes"]
    del ballast


def test_every_fidelity_case_can_be_built():
    """Each mechanism's fidelity knob values must be valid options at the sweep's head count."""
    import attnkit
    from attnkit.bench.fidelity import fidelity_cases

    seen = set()
    for case in fidelity_cases(lengths=(8,)):
        key = (case.mechanism, case.options)
        if key not in seen:
            seen.add(key)
            attnkit.create(
                case.mechanism,
                heads=case.heads,
                head_dim=case.head_dim,
                **{k: v for k, v in case.options if v is not None},
            )
    assert len({m for m, _ in seen}) >= 10


def test_spatial_mechanisms_are_timed_on_square_images():
    from attnkit.bench.cases import speed_cases
    from attnkit.bench.fidelity import fidelity_cases

    cases = [c for c in speed_cases(names="cswin", lengths=(256, 300), modes=("fwd", "decode"), decode_lengths=(256,))
             if c.mechanism == "cswin"]  # fmt: skip
    assert {(c.tokens, c.mode) for c in cases} == {(256, "fwd")}  # 300 is no square; a grid decodes by rows
    assert cases[0].spatial_shape == (16, 16)
    assert {c.tokens for c in fidelity_cases("cswin", lengths=(256, 300))} == {256}
