"""Timing with ``torch.utils.benchmark``: a subject and its baseline, interleaved, until the spread is small.

``Timer`` does the timing itself (threads, CUDA synchronisation, the timeit loop). What is added here
is the schedule a paired figure needs: blocks of the subject and of its baseline alternate
(A B B A A B ...), so a slow phase of the machine hits both, and the speed-up is the median of the
per-round ratios, not a ratio of two medians taken minutes apart.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

from torch.utils.benchmark import Measurement, Timer
from torch.utils.benchmark.utils.common import set_torch_threads

BLOCK_S = 0.02  # one block of calls lasts at least this long (averages out scheduler ticks of a few ms)
FAST_BLOCK = 4  # blocks of at least this many calls go through Timer.timeit, warm-up included
COLD_OK_S = 0.25  # calls at least this long are timed without a warm-up call before each block
SPREAD_TARGET = 0.05  # stop once the relative IQR of the subject (and of the ratio) is below this


@dataclass(frozen=True)
class Timing:
    """Per-call latency over ``rounds`` blocks of ``runs`` calls in all."""

    median_ms: float
    iqr_ms: float
    min_ms: float
    runs: int  # calls timed
    rounds: int  # blocks timed (each block is one sample)

    @property
    def spread(self) -> float:
        """Relative spread: IQR over median."""
        return self.iqr_ms / self.median_ms if self.median_ms > 0 else 0.0

    @classmethod
    def of(cls, blocks: list[Measurement]) -> Timing:
        merged = Measurement.merge(blocks)[0]  # one Measurement: each block's per-call time is a sample
        return cls(
            merged.median * 1e3,
            merged.iqr * 1e3,
            min(merged.times) * 1e3,
            sum(b.number_per_run for b in blocks),
            len(merged.times),
        )

    def __str__(self) -> str:
        return f"{self.median_ms:.3g} ms (IQR {self.iqr_ms:.2g}, min {self.min_ms:.3g}, n={self.runs})"


@dataclass(frozen=True)
class Paired:
    subject: Timing
    baseline: Timing | None
    speedup: float | None  # median over rounds of baseline time / subject time (> 1: subject faster)
    speedup_spread: float | None  # relative IQR of those per-round ratios


def _relative_iqr(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    q = statistics.quantiles(values, n=4, method="inclusive")
    med = statistics.median(values)
    return (q[2] - q[0]) / med if med > 0 else 0.0


def warmups(number: int, call_s: float) -> int:
    """Untimed calls before a block of ``number`` calls of ``call_s`` seconds each.

    After the other side's block, caches and the allocator hold the other callable's state; a block
    starts warm, as ``Timer.timeit`` does (``max(number // 100, 2)`` calls for blocks of many calls).
    A block of a few slow calls gets one warm-up call, or none from ``COLD_OK_S`` on, where refilling
    caches is a negligible share of a call (two warm-ups would triple the cost of a 1-second case).
    """
    if number >= FAST_BLOCK:
        return max(number // 100, 2)
    return 0 if call_s >= COLD_OK_S else 1


class _Side:
    """One timed callable: its Timer, block size and the blocks measured so far."""

    def __init__(self, fn: Callable[[], object], threads: int, max_calls: int | None, block_s: float):
        self.timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)
        self.threads = threads
        self.calls_left = max_calls
        self.blocks: list[Measurement] = []
        first = self.timer.timeit(1)  # warm-up (2 calls), and the estimate that sizes the blocks
        self.call_s = first.times[0]
        if self.calls_left is not None:
            self.calls_left -= 3
        self.number = max(1, min(1000, round(block_s / max(self.call_s, 1e-7))))
        if self.calls_left is not None:  # leave calls for several rounds
            self.number = max(1, min(self.number, self.calls_left // 8 - 2))

    def calls_per_block(self) -> int:
        return self.number + warmups(self.number, self.call_s)

    def _timeit(self, number: int) -> Measurement:
        if self.calls_left is not None:
            self.calls_left -= number + warmups(number, self.call_s)
        if number >= FAST_BLOCK:
            return self.timer.timeit(number)  # warms up max(number // 100, 2) calls itself
        # a few slow calls: the Timer's own timing loop (same clock, same threads) after our warm-up
        with set_torch_threads(self.threads):
            for _ in range(warmups(number, self.call_s)):
                self.timer._timeit(1)
            raw = self.timer._timeit(number)
        return Measurement(number, [raw], self.timer._task_spec)

    def can_run(self) -> bool:
        return self.calls_left is None or self.calls_left >= self.calls_per_block()

    def block(self) -> Measurement:
        m = self._timeit(self.number)
        self.blocks.append(m)
        return m


def time_paired(
    subject: Callable[[], object],
    baseline: Callable[[], object] | None = None,
    *,
    threads: int,
    budget_s: float,
    limit_s: float | None = None,
    min_rounds: int = 5,
    max_rounds: int = 100,
    max_calls: int | None = None,
    block_s: float = BLOCK_S,
) -> Paired:
    """Time ``subject`` (and ``baseline``, interleaved) for ``min_rounds`` rounds, then on until both
    spreads are under ``SPREAD_TARGET`` or ``budget_s`` is spent; never past ``limit_s`` (the case's
    whole budget), nor past ``max_calls`` calls of a side (decoding consumes prepared tokens).
    A block lasts ``block_s`` at least; at least one round runs."""
    started = time.perf_counter()
    a = _Side(subject, threads, max_calls, block_s)
    b = _Side(baseline, threads, max_calls, block_s) if baseline is not None else None
    ratios: list[float] = []
    for i in range(max_rounds):
        if not (a.can_run() and (b is None or b.can_run())):
            break
        order = (a, b) if i % 2 == 0 else (b, a)  # A B, B A, A B ...: linear drift hits both alike
        times = {id(side): side.block().times[0] for side in order if side is not None}
        if b is not None:
            ratios.append(times[id(b)] / times[id(a)])
        done = i + 1 >= min_rounds and _relative_iqr([m.times[0] for m in a.blocks]) <= SPREAD_TARGET
        if b is not None:
            done = done and _relative_iqr(ratios) <= SPREAD_TARGET
        elapsed = time.perf_counter() - started
        if done or (i + 1 >= min_rounds and elapsed > budget_s) or (limit_s is not None and elapsed > limit_s):
            break
    if not a.blocks:
        raise RuntimeError(f"no call left to time (max_calls={max_calls})")
    return Paired(
        Timing.of(a.blocks),
        Timing.of(b.blocks) if b is not None else None,
        statistics.median(ratios) if ratios else None,
        _relative_iqr(ratios) if ratios else None,
    )


def time_call(fn: Callable[[], object], *, threads: int, budget_s: float = 1.0, min_rounds: int = 5) -> Timing:
    """Time one callable alone (no baseline)."""
    return time_paired(fn, threads=threads, budget_s=budget_s, min_rounds=min_rounds).subject
