"""The sweep: run each case in a fresh worker process, write its row, never let one case end the run.

Resumable (cases already in the store are skipped unless ``force``), budgeted (a case predicted to
exceed the time or memory budget from the smaller lengths of its own series is recorded as skipped
with the reason), and interruptible (Ctrl-C kills the worker, marks the run interrupted and keeps
every row already written).
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import signal
import time
from dataclasses import asdict, dataclass, field

import torch

from .cases import Case
from .env import command_line, environment, matmul_peak_gflops, new_run_id
from .progress import Progress
from .store import Run, Store
from .worker import SEED

log = logging.getLogger(__name__)
WORKER_START_S = 30.0  # allowance for a worker's interpreter and torch import, on top of the case budget


@dataclass(frozen=True)
class Budget:
    time_s: float = 60.0  # per case: warm-up plus timed runs
    memory_bytes: int = 0  # per case peak; 0: 60% of the memory available when the sweep starts

    def resolved_memory(self) -> int:
        if self.memory_bytes:
            return self.memory_bytes
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(int(line.split()[1]) * 1024 * 0.6)
        except OSError:
            pass
        return 8 * 2**30


@dataclass
class Summary:
    run_id: str = ""
    measured: int = 0
    already_done: int = 0
    skipped: int = 0
    failed: int = 0
    interrupted: bool = False
    failures: list[str] = field(default_factory=list)

    def text(self) -> str:
        parts = [
            f"{self.measured} measured",
            f"{self.already_done} already in the store",
            f"{self.skipped} skipped (budget)",
            f"{self.failed} failed",
        ]
        return ("interrupted: " if self.interrupted else "sweep done: ") + ", ".join(parts)

    def count(self, label: str, status: str, reason: str | None = None) -> None:
        """Tally one finished case (any status but ok is a failure, listed with its reason)."""
        if status == "ok":
            self.measured += 1
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
    ms: float | None = None
    peak: int | None = None


def predict_skip(case: Case, history: list[_Point], budget: Budget, memory_limit: int) -> str | None:
    """Why ``case`` should not run, judging from the smaller lengths of its series (None: run it)."""
    if case.path == "reference":
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
    ok = [p for p in history if p.status == "ok"]
    if not ok:
        return None
    prev = ok[-1]
    growth = 2.0  # quadratic in T bounds every mechanism; sharpen it from the series' own last two points
    if len(ok) >= 2 and ok[-2].ms and prev.ms:
        growth = min(2.2, max(1.0, math.log(prev.ms / ok[-2].ms) / math.log(prev.tokens / ok[-2].tokens)))
    ratio = (case.tokens / prev.tokens) ** growth
    per_call_s = prev.ms / 1e3 * ratio
    total_s = per_call_s * (2 + case.runs)
    if total_s > budget.time_s:
        return (
            f"predicted {total_s:.0f} s ({per_call_s:.1f} s a call, from {prev.ms:.0f} ms at T={prev.tokens}"
            f" grown as T^{growth:.1f}) exceeds the per-case time budget of {budget.time_s:.0f} s"
        )
    if prev.peak and prev.peak * ratio > memory_limit:
        return (
            f"predicted peak {prev.peak * ratio / 2**30:.1f} GiB exceeds the memory budget of"
            f" {memory_limit / 2**30:.1f} GiB"
        )
    return None


_CONTEXT = None


def _context():
    """A forkserver that has imported torch and attnkit once: each case is a fresh process forked from
    it (no torch import per case, no thread pools inherited from this process)."""
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = multiprocessing.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(["attnkit.bench.worker"])
    return _CONTEXT


def run_worker(case: Case, threads: int, timeout_s: float) -> dict:
    """Measure one case in a fresh process; a crash, kill or hang becomes a status, never an exception."""
    from . import worker

    ctx = _context()
    parent, child_end = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=worker.child, args=(child_end, {**asdict(case), "threads": threads}), daemon=True)
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


def run_sweep(
    store: Store,
    cases: list[Case],
    *,
    threads: int | None = None,
    force: bool = False,
    budget: Budget | None = None,
    show_progress: bool = True,
) -> Summary:
    """Measure every case not yet in the store; returns counts (and whether Ctrl-C stopped it)."""
    budget = budget or Budget()
    threads = threads or torch.get_num_threads()
    device = cases[0].device if cases else "cpu"
    env = environment(device, threads, SEED)
    todo = [c for c in cases if force or not store.done(c.key(env["device"], threads))]
    summary = Summary(already_done=len(cases) - len(todo))
    if not todo:
        return summary
    peaks = {d: matmul_peak_gflops(device, getattr(torch, d)) for d in sorted({c.dtype for c in todo})}
    log.info("matmul peak: %s", ", ".join(f"{d} {g:.0f} GFLOP/s" for d, g in peaks.items()))
    run_id = new_run_id()
    first = next(iter(peaks))
    run = store.start_run(run_id, env, command_line(), matmul_gflops=peaks[first], matmul_dtype=first)
    summary.run_id = run_id
    memory_limit = budget.resolved_memory()
    history: dict[tuple, list[_Point]] = {}
    progress = Progress(len(todo), enabled=show_progress)
    try:
        for case in todo:
            progress.start(case.label())
            points = history.setdefault(case.series, [])
            row = {**case.row(), "case_key": case.key(env["device"], threads)}
            reason = predict_skip(case, points, budget, memory_limit)
            if reason:
                store.add(run, {**row, "status": "skipped", "reason": reason})
                summary.skipped += 1
                progress.finish_case(None)
                continue
            started = time.perf_counter()
            result = run_worker(case, threads, budget.time_s * 3 + WORKER_START_S)
            if result.get("gflops") and peaks.get(case.dtype):
                result["peak_fraction"] = result["gflops"] / peaks[case.dtype]
            store.add(run, {**row, **result})
            points.append(_Point(case.tokens, result["status"], result.get("median_ms"), result.get("peak_bytes")))
            summary.count(case.label(), result["status"], result.get("reason"))
            progress.finish_case(time.perf_counter() - started)
    except KeyboardInterrupt:
        return summary.close(store, run, progress, interrupted=True)
    return summary.close(store, run, progress)
