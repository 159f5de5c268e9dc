"""Timing and memory probes used by the benchmark."""

from __future__ import annotations

import torch

from attnkit.bench.cases import Case
from attnkit.bench.memory import call_peak_bytes
from attnkit.bench.runner import run_worker
from attnkit.bench.timing import time_fn


def test_time_fn_reports_median_and_spread():
    calls = []
    t = time_fn(lambda: calls.append(1), warmup=2, runs=4)
    assert len(calls) == 6 and t.runs == 4 and t.min_ms <= t.median_ms <= t.max_ms


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
                            head_dim=16, runs=1), threads=1, timeout_s=120)  # fmt: skip
    big = run_worker(Case("speed", "sliding_window", "blocked", "causal_self", "fwdbwd", 4096, options={"window": 64},
                          runs=1), threads=1, timeout_s=300)  # fmt: skip
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
