"""Timing and memory probes used by the benchmark."""

from __future__ import annotations

import torch

from attnkit.bench.memory import CallSpec, call_peak_bytes, peak_memory_cpu
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


def test_subprocess_probe_is_not_fooled_by_a_big_parent():
    ballast = torch.ones(300 * 2**20 // 4)  # the parent's peak must not hide the child's
    small, _ = peak_memory_cpu(CallSpec("softmax", "noncausal_self", 1, 256, 256, 2, 2, 16))
    big, path = peak_memory_cpu(
        CallSpec("sliding_window", "causal_self", 1, 4096, 4096, 8, 8, 64, options={"window": 64}, backward=True)
    )
    assert path == "blocked" and big > 10 * 2**20 and big > 4 * small
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
