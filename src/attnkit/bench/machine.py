"""Is the machine quiet? What other processes and the hypervisor took while a case was measured.

A figure timed while other processes compete for the cores is not a figure: with two threads on two
cores, one busy neighbour can make a case 10x slower and turn a winning mechanism into a losing one.
Three signals, each recorded on the row:

- ``others_cores``: CPU time used by every other process during the measurement, per second of wall
  time (from ``/proc/stat`` minus this process's own ``getrusage``); above the cores the benchmark
  leaves free, the case competed for its cores;
- ``steal``: the share of CPU time the hypervisor gave to other guests (``/proc/stat``);
- ``calib_gflops``: a small matmul timed just before the case, against the best one seen this run.

Where the OS offers no ``/proc/stat`` the first two are None and only the calibration and the spread
of the timings judge the row.
"""

from __future__ import annotations

import logging
import os
import resource
import time
from dataclasses import dataclass

import torch

from .timing import time_call

log = logging.getLogger(__name__)

OTHERS_MARGIN = 0.3  # cores other processes may use beyond those the benchmark leaves free
STEAL_LIMIT = 0.1  # share of CPU time stolen by the hypervisor
CALIBRATION_DROP = 0.7  # a matmul slower than this share of the run's best: the machine is slower now
SPREAD_LIMIT = 0.25  # relative IQR of a timing (or of its paired ratio) above which it is doubtful
CALIBRATION_SIZE = 768  # square matmul of the quick calibration (~4 ms on 2 cores)
MIN_WINDOW_S = 0.25  # shorter windows are too coarse for /proc/stat's 10 ms ticks


@dataclass(frozen=True)
class CpuSample:
    wall: float  # monotonic seconds
    busy: float  # CPU seconds all processes used (all cores)
    steal: float  # CPU seconds stolen by the hypervisor
    total: float  # CPU seconds of all kinds
    own: float  # CPU seconds this process used


def _proc_stat() -> tuple[float, float, float] | None:
    """(busy, steal, total) CPU seconds since boot, all cores, or None without /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    busy = user + nice + system + irq + softirq
    return busy / hz, steal / hz, (busy + idle + iowait + steal) / hz


def sample() -> CpuSample | None:
    stat = _proc_stat()
    if stat is None:
        return None
    use = resource.getrusage(resource.RUSAGE_SELF)
    return CpuSample(time.monotonic(), stat[0], stat[1], stat[2], use.ru_utime + use.ru_stime)


@dataclass(frozen=True)
class Load:
    others_cores: float | None  # cores' worth of CPU other processes used
    steal: float | None  # share of CPU time stolen

    @staticmethod
    def between(a: CpuSample | None, b: CpuSample | None) -> Load:
        if a is None or b is None or b.wall - a.wall < MIN_WINDOW_S:
            return Load(None, None)
        wall = b.wall - a.wall
        others = max(0.0, (b.busy - a.busy) - (b.own - a.own)) / wall
        total = b.total - a.total
        return Load(others, (b.steal - a.steal) / total if total > 0 else 0.0)


def spare_cores(threads: int) -> int:
    """Cores the benchmark leaves to everything else."""
    return max(0, (os.cpu_count() or 1) - threads)


# What each kind of doubt means, for summaries: a doubt reads "<kind>: <details>"
DOUBT_KINDS = {
    "busy": "the machine was busy",
    "steal": "the hypervisor took CPU time",
    "slow": "the machine ran slower than earlier in the run",
    "spread": "the timings spread widely",
}


def busy_reason(load: Load, threads: int) -> str | None:
    """Why this load makes a timing doubtful (None: it does not)."""
    allowed = spare_cores(threads) + OTHERS_MARGIN
    if load.others_cores is not None and load.others_cores > allowed:
        return f"busy: other processes used {load.others_cores:.1f} cores (at most {allowed:.1f} leaves ours alone)"
    if load.steal is not None and load.steal > STEAL_LIMIT:
        return f"steal: the hypervisor stole {load.steal:.0%} of the CPU time"
    return None


def calibrate(device: str = "cpu") -> float:
    """A quick matmul's GFLOP/s with the current thread count (fp32): the machine's speed right now."""
    n = CALIBRATION_SIZE * (4 if device.startswith("cuda") else 1)
    a = torch.randn(n, n, device=device)
    t = time_call(lambda: a @ a, threads=torch.get_num_threads(), budget_s=0.05, min_rounds=4)
    return 2 * n**3 / (t.min_ms * 1e-3) / 1e9


def doubts(
    *,
    load: Load,
    threads: int,
    calib_gflops: float | None,
    best_calib: float | None,
    spread: float | None,
    speedup_spread: float | None,
) -> list[str]:
    """Every reason a measured row is doubtful (empty: it is a figure)."""
    reasons = []
    busy = busy_reason(load, threads)
    if busy:
        reasons.append(busy)
    if calib_gflops and best_calib and calib_gflops < CALIBRATION_DROP * best_calib:
        reasons.append(f"slow: a matmul ran at {calib_gflops / best_calib:.0%} of this run's best speed")
    if spread is not None and spread > SPREAD_LIMIT:
        reasons.append(f"spread: the timings spread {spread:.0%} (IQR over median)")
    if speedup_spread is not None and speedup_spread > SPREAD_LIMIT:
        reasons.append(f"spread: the paired ratios to SDPA spread {speedup_spread:.0%}")
    return reasons


def busy_now(threads: int, seconds: float = 1.0) -> str | None:
    """Watch the machine for ``seconds`` from this (idle) process; why it is busy, or None."""
    a = sample()
    time.sleep(seconds)
    return busy_reason(Load.between(a, sample()), threads)


def wait_quiet(threads: int, *, max_wait_s: float = 600.0, poll_s: float = 2.0) -> str | None:
    """Block until the machine is quiet (or ``max_wait_s`` passed); the reason it was still busy, or None."""
    deadline = time.monotonic() + max_wait_s
    reason = busy_now(threads, poll_s)
    if reason:
        log.warning("%s; waiting for it to calm down (up to %.0f s)", reason, max_wait_s)
    while reason and time.monotonic() < deadline:
        reason = busy_now(threads, poll_s)
    return reason
