"""``attnkit bench cp``: context parallelism measured. For each mechanism x strategy x W x T (growing), W fresh
processes (``attnkit.distributed.launch``) run one forward + backward step of ``attend`` on their shards:

- time: the slowest rank's step, per step, over ``runs`` steps after a warm-up (the ranks start each step together);
- memory: each rank's peak resident-set growth over one step (``bench.memory.call_peak_bytes``); the row's
  ``peak_bytes`` is the largest rank's, ``extra.peak_bytes_per_rank`` has them all;
- communication: bytes each rank sends, forward and backward, measured (``cp_traffic.counting``) and by the
  strategy's formula;
- correctness: the step's output and q/k/v gradients against one process attending the whole sequence (same
  inputs), max absolute error over the ranks, for T up to ``check_max_tokens``.

One launch per case (a fresh process group, as ``bench speed`` uses a fresh process per case), T ascending: once a
T fails (a rank runs out of memory, dies, or times out), the larger T of that mechanism, strategy and W are recorded
as skipped, so "the largest T each W holds" is the largest T with an ``ok`` row. Rows are ``kind = "cp"``.
"""

from __future__ import annotations

import itertools
import logging
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from ..api import create
from ..distributed import attend, launch, shard
from ..errors import AttnkitError
from .cp_traffic import counting, formula_bytes
from .env import command_line, environment, new_run_id
from .memory import call_peak_bytes
from .store import Store

log = logging.getLogger(__name__)
SEED = 0
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class CPCase:
    mechanism: str
    strategy: str  # a strategy name, or "auto"
    world: int
    tokens: int
    pattern: str = "causal_self"
    layout: str = "zigzag"
    batch: int = 1
    heads: int = 8
    kv_heads: int = 8
    head_dim: int = 64
    dtype: str = "float32"
    options: tuple[tuple[str, Any], ...] = ()

    def key(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in self.options)
        return (f"cp|{self.mechanism}|{self.strategy}|{self.pattern}|{self.layout}|W{self.world}|T{self.tokens}|"
                f"B{self.batch}|H{self.heads}/{self.kv_heads}|D{self.head_dim}|{self.dtype}|{opts}")  # fmt: skip

    def series(self) -> tuple:
        """The cases that differ only by T (a failure at one T skips the larger)."""
        return tuple(v for k, v in asdict(self).items() if k != "tokens")


def cp_cases(mechanisms: list[tuple[str, dict]], *, strategy: str, worlds, lengths, **sizes: Any) -> list[CPCase]:
    """Every mechanism (name, options) x W x T, T ascending within each series."""
    return [
        CPCase(name, strategy, w, t, options=tuple(sorted(opts.items())), **sizes)
        for (name, opts), w, t in itertools.product(mechanisms, sorted(worlds), sorted(lengths))
    ]


# ---- inside each rank ----------------------------------------------------------------------------------------


def _inputs(case: CPCase) -> list[torch.Tensor]:
    """q, k, v and the output's cotangent over the whole sequence, the same on every rank (seeded)."""
    gen = torch.Generator().manual_seed(SEED + case.tokens)
    dt = DTYPES[case.dtype]
    shapes = [case.heads, case.kv_heads, case.kv_heads, case.heads]
    return [torch.randn(case.batch, case.tokens, h, case.head_dim, generator=gen).to(dt) for h in shapes]


def _max_error(case: CPCase, mech, rank: int, full: list[torch.Tensor], mine: list[torch.Tensor]) -> float:
    """This rank's output and q, k, v gradients against one process attending the whole sequence."""
    q, k, v, g = (t.detach().clone().requires_grad_(i < 3) for i, t in enumerate(full))
    out = mech(q, k, v, pattern=case.pattern)
    out.backward(g)
    refs = [out, q.grad, k.grad, v.grad]
    return max((m.double() - shard(r, case.world, rank, case.layout).double()).abs().max().item()
               for m, r in zip(mine, refs, strict=True))  # fmt: skip


def measure_on_rank(rank: int, world: int, case_fields: dict, runs: int, check_max_tokens: int) -> dict:
    """One case on this rank (called by ``launch.run`` in every process)."""
    case = CPCase(**{**case_fields, "options": tuple(tuple(kv) for kv in case_fields["options"])})
    full = _inputs(case)
    q, k, v, g = (shard(t, world, rank, case.layout) for t in full)
    mech = create(case.mechanism, heads=case.heads, head_dim=case.head_dim, **dict(case.options))
    call = dict(pattern=case.pattern, strategy=case.strategy, layout=case.layout)

    def step() -> list[torch.Tensor]:
        ins = [t.detach().requires_grad_() for t in (q, k, v)]
        out = attend(*ins, mech, **call)
        out.backward(g)
        return [out.detach(), *(t.grad for t in ins)]

    try:
        ins = [t.detach().requires_grad_() for t in (q, k, v)]
        with counting() as fwd:
            out = attend(*ins, mech, **call)  # the warm-up step, counted
        with counting() as bwd:
            out.backward(g)
    except AttnkitError as err:  # every rank refuses alike (validation, no strategy fits)
        return {"status": "not_applicable", "reason": str(err)}
    mine = [out.detach(), *(t.grad for t in ins)]
    peak = call_peak_bytes(step)
    times = []
    for _ in range(runs):
        dist.barrier()
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    checked = case.tokens <= check_max_tokens
    return {
        "status": "ok", "times": times, "peak_bytes": peak, "fwd_bytes": fwd.payload, "bwd_bytes": bwd.payload,
        "other_bytes": fwd.other + bwd.other, "error": _max_error(case, mech, rank, full, mine) if checked else None,
    }  # fmt: skip


# ---- the parent --------------------------------------------------------------------------------------------------


@dataclass
class CPSummary:
    counts: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)

    def text(self) -> str:
        return "cp sweep done: " + ", ".join(f"{n} {s}" for s, n in sorted(self.counts.items()))


def _row(case: CPCase, ranks: list[dict]) -> dict[str, Any]:
    """The store row of one case from every rank's result."""
    elt = torch.empty(0, dtype=DTYPES[case.dtype]).element_size()
    steps = [max(ts) * 1e3 for ts in zip(*(r["times"] for r in ranks), strict=True)]  # the slowest rank, per step
    q1, _, q3 = statistics.quantiles(steps, n=4) if len(steps) > 1 else (steps[0],) * 3
    ran = _strategy_of(case)
    mech = create(case.mechanism, heads=case.heads, head_dim=case.head_dim, **dict(case.options))
    formula = formula_bytes(ran, world=case.world, tokens=case.tokens, batch=case.batch,
                            heads=case.heads, kv_heads=case.kv_heads, head_dim=case.head_dim, element_size=elt,
                            options=dict(case.options), mech=mech, pattern=case.pattern,
                            layout=case.layout)  # fmt: skip
    errors = [r["error"] for r in ranks if r["error"] is not None]
    extra = {
        "world": case.world, "layout": case.layout, "strategy": case.strategy, "ran": ran,
        "peak_bytes_per_rank": [r["peak_bytes"] for r in ranks],
        "bytes_fwd": max(r["fwd_bytes"] for r in ranks), "bytes_bwd": max(r["bwd_bytes"] for r in ranks),
        "bytes_other": max(r["other_bytes"] for r in ranks),
        "formula_fwd": formula[0] if formula else None, "formula_bwd": formula[1] if formula else None,
        "checked": bool(errors),
    }  # fmt: skip
    return dict(
        status="ok", median_ms=statistics.median(steps), min_ms=min(steps), iqr_ms=q3 - q1, runs=len(steps),
        rounds=len(steps), peak_bytes=max(r["peak_bytes"] for r in ranks), error=max(errors) if errors else None,
        extra=extra,
    )  # fmt: skip


def _strategy_of(case: CPCase) -> str:
    """The strategy that runs the case (``auto``'s pick); raises the refusal when none fits (before any launch)."""
    from ..distributed import choose
    from ..patterns import as_pattern

    mech = create(case.mechanism, heads=case.heads, head_dim=case.head_dim, **dict(case.options))
    sizes = dict(layout=case.layout, world=case.world, total=case.tokens, heads=case.heads, kv_heads=case.kv_heads)
    return choose(mech, as_pattern(case.pattern), case.strategy, **sizes).name


def _base_row(case: CPCase) -> dict[str, Any]:
    return dict(kind="cp", case_key=case.key(), mechanism=case.mechanism, path=case.strategy, pattern=case.pattern,
                mode="fwdbwd", tokens=case.tokens, tq=case.tokens, tk=case.tokens, batch=case.batch,
                heads=case.heads, kv_heads=case.kv_heads, head_dim=case.head_dim, dtype=case.dtype,
                options=dict(case.options), extra={"world": case.world, "layout": case.layout,
                                                   "strategy": case.strategy})  # fmt: skip


def run_cp(store: Store, cases: list[CPCase], *, runs: int = 5, check_max_tokens: int = 8192, timeout: float = 600,
           force: bool = False, say: Callable[[str], None] = log.info) -> CPSummary:  # fmt: skip
    """Measure every case not yet in the store (``force``: all) into ``store``; returns the counts."""
    summary = CPSummary()
    run = store.start_run(new_run_id(), environment("cpu", 1, SEED), command_line())
    failed: dict[tuple, str] = {}  # series -> the failure that skips its larger T
    try:
        for case in cases:
            if not force and store.done(case.key()):
                summary.counts["already in the store"] += 1
                continue
            row = _base_row(case) | _measure(case, failed, runs, check_max_tokens, timeout)
            store.add(run, row)
            summary.counts[row["status"]] += 1
            if row["status"] not in ("ok", "not_applicable", "skipped"):
                summary.failures.append(f"{case.key()}: {row['reason']}")
            say(f"{case.key()}: {row['status']} " + (f"{row['median_ms']:.1f} ms" if row["status"] == "ok" else
                                                      row.get("reason") or ""))  # fmt: skip
    finally:
        store.finish_run(run)
    return summary


def _measure(case: CPCase, failed: dict, runs: int, check_max_tokens: int, timeout: float) -> dict[str, Any]:
    if case.series() in failed:
        return dict(status="skipped", reason=f"a smaller T failed: {failed[case.series()]}")
    try:
        _strategy_of(case)
    except AttnkitError as err:  # refused here: no processes to start
        return dict(status="not_applicable", reason=str(err))
    try:
        ranks = launch.run(case.world, measure_on_rank, asdict(case), runs, check_max_tokens, timeout=timeout,
                           collective_timeout=min(timeout, 300))  # fmt: skip
    except launch.RankFailed as err:
        first = str(err).splitlines()[0]
        oom = "signal 9" in first or "out of memory" in first.lower() or "MemoryError" in first
        failed[case.series()] = f"T={case.tokens}: {first}"
        return dict(status="oom" if oom else "error", reason=first)
    if ranks[0]["status"] != "ok":
        return dict(status=ranks[0]["status"], reason=ranks[0]["reason"])
    return _row(case, ranks)
