"""The sweep: one loop for every kind of case (speed, decode, peer, fidelity; quality next).

Each case is measured in a fresh worker process when it asks for isolation (``BenchCase.isolated``),
else in this process; either way a failure is a recorded status and the sweep goes on. Resumable
(cases already in the store are skipped unless ``force``), budgeted (a case predicted to exceed the
time or memory budget from the smaller lengths of its own series is recorded as skipped, with the
figure it was predicted from), watchful (every timed row records what else the machine was doing,
and is flagged doubtful when that was too much, or when its timings spread), and interruptible
(Ctrl-C kills the worker, marks the run interrupted and keeps every row already written; a run
killed outright is marked interrupted by the next sweep on the store).
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import signal
import time
from collections import Counter
from dataclasses import dataclass, field

import torch

from . import machine
from .case import SEED, BenchCase, Budget, available_memory  # noqa: F401 - re-exported
from .env import command_line, environment, matmul_peak_gflops, new_run_id
from .progress import Progress
from .store import Run, Store
from .worker import measure_watched

log = logging.getLogger(__name__)
WORKER_START_S = 30.0  # allowance for a worker's interpreter and torch import, on top of the case budget


@dataclass
class Summary:
    run_id: str = ""
    measured: int = 0
    already_done: int = 0
    skipped: int = 0
    failed: int = 0
    doubtful: int = 0  # measured, but flagged: the machine was busy or the timings spread
    not_applicable: int = 0  # a quality case whose task needs a pattern the mechanism lacks
    diverged: int = 0  # a quality case whose loss stopped being finite
    interrupted: bool = False
    failures: list[str] = field(default_factory=list)
    doubts: Counter = field(default_factory=Counter)  # rows per kind of doubt (machine.DOUBT_KINDS)

    def text(self) -> str:
        parts = [
            f"{self.measured} measured",
            f"{self.already_done} already in the store",
            f"{self.skipped} skipped (budget)",
            f"{self.failed} failed",
        ]
        parts += [f"{self.not_applicable} not applicable"] if self.not_applicable else []
        parts += [f"{self.diverged} diverged"] if self.diverged else []
        return ("interrupted: " if self.interrupted else "sweep done: ") + ", ".join(parts)

    def doubt_text(self) -> str | None:
        """``12 of 268 figures are doubtful: the machine was busy (12), timings spread (3)``, or None."""
        if not self.doubtful:
            return None
        why = ", ".join(f"{machine.DOUBT_KINDS.get(kind, kind)} ({n})" for kind, n in self.doubts.most_common())
        return f"{self.doubtful} of {self.measured} figures are doubtful: {why}"

    def count(self, label: str, status: str, reason: str | None = None, doubts: list[str] | None = None) -> None:
        """Tally one finished case (any status but ok is a failure, listed with its reason)."""
        if status == "ok":
            self.measured += 1
            if doubts:
                self.doubtful += 1
                self.doubts.update({d.split(":")[0] for d in doubts})
        elif status == "not_applicable":
            self.not_applicable += 1
        elif status == "diverged":
            self.diverged += 1
        else:
            self.failed += 1
            self.failures.append(f"{label}: {status}: {reason}")

    def close(self, store: Store, run: Run, progress: Progress, *, interrupted: bool = False) -> Summary:
        """Mark the run finished (or interrupted) in the store and end the progress bar."""
        self.interrupted = interrupted
        store.finish_run(run, "interrupted" if interrupted else "finished")
        progress.close(self.text())
        return self


@dataclass
class _Point:
    tokens: int
    status: str
    ms: float | None = None  # the fastest run (min over blocks)
    peak: int | None = None
    doubtful: bool = False


def predict_skip(case: BenchCase, history: list[_Point], budget: Budget, memory_limit: int) -> str | None:
    """Why ``case`` should not run, judging from the smaller lengths of its series (None: run it).

    The time is extrapolated from the fastest run of the last trustworthy point (never a doubtful
    one), grown as the series' own measured exponent between its last two trustworthy points, held
    to the path's declared complexity (a path declared linear is never grown as T²), or as the
    declared exponent alone when there is one point.
    """
    if getattr(case, "path", None) == "reference" and getattr(case, "mode", "") != "decode":
        # the naive baseline materialises the score matrix: [B, H, Tq, Tk] fp32, about 3 copies alive
        scores = case.batch * case.heads * case.tq * case.tk * 4 * (3 if case.mode != "fwdbwd" else 5)
        if scores > memory_limit:
            return (
                f"the materialised scores need ~{scores / 2**30:.1f} GiB, over the memory budget of"
                f" {memory_limit / 2**30:.1f} GiB"
            )
    if not history:
        return None
    last = history[-1]
    if last.status in ("timeout", "oom"):
        return f"T={last.tokens} already ended in {last.status}"
    good = [p for p in history if p.status == "ok" and not p.doubtful and p.ms]
    if not good:
        return None
    prev = good[-1]
    declared = case.declared_growth()
    growth, how = declared, f"declared T^{declared:g}"
    if len(good) >= 2:
        measured = math.log(prev.ms / good[-2].ms) / math.log(prev.tokens / good[-2].tokens)
        growth = min(declared + 0.2, max(1.0, measured))
        how = f"measured T^{measured:.2f}, held to [1, {declared + 0.2:g}] by the declared T^{declared:g}"
    ratio = (case.tokens / prev.tokens) ** growth
    per_call_s = prev.ms / 1e3 * ratio
    total_s = per_call_s * case.calls()
    source = f"the fastest run at T={prev.tokens}, {prev.ms:.3g} ms, grown as T^{growth:.2f} ({how})"
    if total_s > budget.time_s:
        return (
            f"predicted {total_s:.0f} s ({per_call_s:.2g} s a call, from {source}) exceeds the per-case"
            f" time budget of {budget.time_s:.0f} s"
        )
    if prev.peak and prev.peak * ratio > memory_limit:
        return (
            f"predicted peak {prev.peak * ratio / 2**30:.1f} GiB (from {prev.peak / 2**20:.0f} MiB at"
            f" T={prev.tokens}) exceeds the memory budget of {memory_limit / 2**30:.1f} GiB"
        )
    return None


_CONTEXT = None
# Imported once by the forkserver, so that no worker pays for importing torch, attnkit or its cases. A
# worker also re-runs the parent's main module: for `attnkit ...` that imports attnkit.cli (and with it
# the report's matplotlib), 0.35 s a case unless the forkserver holds it already.
PRELOAD = ["attnkit.bench.worker", "attnkit.bench.speed", "attnkit.bench.fidelity", "attnkit.cli"]


def _context():
    """A forkserver that has imported torch and attnkit once: each case is a fresh process forked from
    it (no torch import per case, no thread pools inherited from this process)."""
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = multiprocessing.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(PRELOAD)
    return _CONTEXT


def run_worker(case: BenchCase, threads: int, timeout_s: float, budget: Budget | None = None) -> dict:
    """Measure one case in a fresh process; a crash, kill or hang becomes a status, never an exception."""
    from . import worker

    ctx = _context()
    parent, child_end = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=worker.child, args=(child_end, case, threads, budget or Budget()), daemon=True)
    proc.start()
    child_end.close()
    try:
        if parent.poll(timeout_s):
            try:
                result = parent.recv()
            except EOFError:  # died while sending
                result = None
        else:
            result = {"status": "timeout", "reason": f"did not finish within {timeout_s:.0f} s"}
        proc.join(timeout=10)
    finally:
        if proc.is_alive():  # timed out, or Ctrl-C while waiting: never leave the worker running
            proc.kill()
            proc.join()
        parent.close()
    if result is None:
        code = proc.exitcode
        if code in (-signal.SIGKILL, 137):
            return {"status": "oom", "reason": f"the worker was killed (exit {code}), most likely out of memory"}
        return {"status": "error", "reason": f"the worker died with exit code {code}"}
    return result


class _Watch:
    """The machine's speed over the run: the best quick-matmul calibration seen so far."""

    def __init__(self, threads: int):
        self.threads = threads
        self.best_calib: float | None = None

    def judge(self, result: dict) -> list[str]:
        """The row's doubts (the best calibration is updated after judging)."""
        calib = result.get("calib_gflops")
        reasons = machine.doubts(
            load=machine.Load(result.get("others_cores"), result.get("steal")),
            threads=self.threads,
            calib_gflops=calib,
            best_calib=self.best_calib,
            spread=result.pop("spread", None),
            speedup_spread=result.get("speedup_spread"),
        )
        if calib:
            self.best_calib = max(self.best_calib or 0.0, calib)
        return reasons


def run_cases(
    store: Store,
    cases: list[BenchCase],
    *,
    threads: int | None = None,
    force: bool = False,
    budget: Budget | None = None,
    show_progress: bool = True,
    wait_quiet: bool = False,
) -> Summary:
    """Measure every case not yet in the store, in order; returns counts (and whether Ctrl-C stopped it).

    ``wait_quiet``: before each timed case, wait (up to 10 minutes) until the machine is quiet.
    """
    budget = budget or Budget()
    threads = threads or torch.get_num_threads()
    device = next((c.device for c in cases if hasattr(c, "device")), "cpu")
    env = environment(device, threads, SEED)
    abandoned = store.mark_abandoned_runs()
    if abandoned:
        log.warning("marked %d earlier run(s) interrupted: their process is gone (%s)", len(abandoned),
                    ", ".join(abandoned))  # fmt: skip
    todo = [c for c in cases if force or not store.done(c.key(env["device"], threads))]
    summary = Summary(already_done=len(cases) - len(todo))
    if not todo:
        return summary
    timed = [c for c in todo if c.timed]
    extra = {}
    if timed:
        dtypes = sorted({c.dtype for c in timed})
        peaks = {d: matmul_peak_gflops(device, getattr(torch, d)) for d in dtypes}
        log.info("matmul peak: %s", ", ".join(f"{d} {g:.0f} GFLOP/s" for d, g in peaks.items()))
        extra = {"matmul_gflops": peaks[dtypes[0]], "matmul_dtype": dtypes[0]}
        busy = machine.busy_now(threads, 0.5)
        if busy:
            log.warning("%s as the sweep starts: its figures may be doubtful (--wait-quiet waits)", busy)
    else:
        peaks = {}
    run = store.start_run(new_run_id(), env, command_line(), **extra)
    summary.run_id = run.run_id
    memory_limit = budget.resolved_memory()
    watch = _Watch(threads)
    history: dict[tuple, list[_Point]] = {}
    progress = Progress(len(todo), enabled=show_progress)
    try:
        for case in todo:
            progress.start(case.label())
            points = history.setdefault(case.series, [])
            row = {**case.row(), "case_key": case.key(env["device"], threads)}
            reason = predict_skip(case, points, budget, memory_limit) if case.timed else None
            if reason:
                store.add(run, {**row, "status": "skipped", "reason": reason})
                summary.skipped += 1
                progress.finish_case(None)
                continue
            if wait_quiet and case.timed:
                still = machine.wait_quiet(threads)
                if still:
                    log.warning("still busy after waiting (%s); measuring anyway, the row will say so", still)
            started = time.perf_counter()
            if case.isolated:
                result = run_worker(case, threads, budget.time_s * 3 + WORKER_START_S, budget)
            else:
                result = measure_watched(case, threads, budget)
            doubts = watch.judge(result) if result["status"] == "ok" and case.timed else []
            if result.get("gflops") and peaks.get(getattr(case, "dtype", "")):
                result["peak_fraction"] = result["gflops"] / peaks[case.dtype]
            store.add(run, {**row, **result, "doubtful": "; ".join(doubts) or None})
            points.append(_Point(case.tokens, result["status"], result.get("min_ms"), result.get("peak_bytes"),
                                 bool(doubts)))  # fmt: skip
            summary.count(case.label(), result["status"], result.get("reason"), doubts)
            progress.finish_case(time.perf_counter() - started)
    except KeyboardInterrupt:
        return summary.close(store, run, progress, interrupted=True)
    return summary.close(store, run, progress)
