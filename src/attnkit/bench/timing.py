"""Wall-clock timing done right: warm-up, several runs, median and spread; CUDA events on GPU."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Timing:
    median_ms: float
    min_ms: float
    max_ms: float
    runs: int

    def __str__(self) -> str:
        return f"{self.median_ms:.2f} ms (min {self.min_ms:.2f}, max {self.max_ms:.2f}, n={self.runs})"


def time_fn(
    fn: Callable[[], object],
    *,
    warmup: int = 1,
    runs: int = 5,
    device: torch.device | str = "cpu",
    budget_s: float | None = None,
) -> Timing:
    """Run ``fn`` ``warmup`` times, then time ``runs`` calls (fewer if ``budget_s`` runs out, at least 1).

    On CUDA each run is bracketed by CUDA events and synchronised; on CPU ``perf_counter`` is used.
    """
    cuda = torch.device(device).type == "cuda"
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    times: list[float] = []
    started = time.perf_counter()
    for _ in range(runs):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        if budget_s is not None and time.perf_counter() - started > budget_s:
            break
    return Timing(statistics.median(times), min(times), max(times), len(times))
