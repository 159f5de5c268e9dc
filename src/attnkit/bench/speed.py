"""Speed, decode and peer cases: latency paired with SDPA in the same worker, peak memory, GFLOP/s.

Every timed case also times its baseline for the same shape, interleaved with it (``timing.py``):
SDPA softmax for forward and forward+backward cases, softmax decoding with a KV cache for decode
cases. The stored ``speedup`` is that paired ratio (SDPA time / case time, > 1: faster than SDPA),
which survives a machine that slows down for a while; ``baseline_ms`` is the baseline's median.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..api import create
from ..mechanism import REGISTRY, Shape
from ..patterns import as_pattern
from .case import BACKWARD_FLOP_FACTOR, BASELINES, SEED, BenchCase, Budget, growth_from_complexity
from .inputs import make_qkv
from .memory import call_peak_bytes
from .peers import peer_call
from .timing import time_paired

DECODE_BLOCK_S = 0.005  # decode blocks are short: each call consumes a prepared token


def square_grid(t: int) -> tuple[int, int] | None:
    """``(s, s)`` when ``t == s * s``: the image a spatial mechanism is benchmarked on (64 x 64 at T = 4096)."""
    s = math.isqrt(t)
    return (s, s) if s * s == t else None


@dataclass(frozen=True)
class Case(BenchCase):
    """One speed, decode or peer measurement. ``tokens`` is T: keys, and queries for self patterns
    (cross: Tq = T / 4; decode: one query at a context of T)."""

    kind: str  # speed | decode | peer
    mechanism: str
    path: str
    pattern: str
    mode: str
    tokens: int
    dtype: str = "float32"
    device: str = "cpu"
    batch: int = 1
    heads: int = 8
    kv_heads: int = 8
    head_dim: int = 64
    options: dict[str, Any] = field(default_factory=dict)
    runs: int = 5  # timed rounds at least (more until the spread is small or the budget ends)
    peer: str | None = None  # peer adapter name (kind == "peer")

    @property
    def tq(self) -> int:
        if self.mode == "decode":
            return 1
        return self.tokens if as_pattern(self.pattern).is_self else max(1, self.tokens // 4)

    @property
    def tk(self) -> int:
        return self.tokens

    @property
    def spatial_shape(self) -> tuple[int, int] | None:
        """The square grid of a spatial mechanism's queries (None: not spatial, or Tq is not a square)."""
        if not REGISTRY.get(self.mechanism).spatial:
            return None
        return square_grid(self.tq)

    @property
    def is_sdpa(self) -> bool:
        return (self.mechanism, self.path) == ("softmax", "sdpa") and self.kind == "speed"

    @property
    def series(self) -> tuple:
        return (
            self.kind,
            self.mechanism,
            self.path,
            self.pattern,
            self.mode,
            self.dtype,
            self.device,
            self.peer,
            json.dumps(self.options, sort_keys=True),
        )

    def shape(self) -> Shape:
        return Shape(
            self.batch, self.tq, self.tk, self.heads, self.kv_heads, self.head_dim, self.head_dim, self.spatial_shape
        )

    def key(self, device_name: str, threads: int) -> str:
        d = asdict(self)
        d.pop("runs")
        return json.dumps({**d, "device_name": device_name, "threads": threads}, sort_keys=True)

    def label(self) -> str:
        base = BASELINES.get((self.mechanism, self.path))
        name = base or (f"{self.peer} (peer)" if self.peer else f"{self.mechanism}/{self.path}")
        return f"{name} {self.pattern} {self.mode} T={self.tokens} {self.dtype}"

    def row(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "mechanism": self.mechanism,
            "path": self.path,
            "pattern": self.pattern,
            "mode": self.mode,
            "tokens": self.tokens,
            "tq": self.tq,
            "tk": self.tk,
            "batch": self.batch,
            "heads": self.heads,
            "kv_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "dtype": self.dtype,
            "options": self.options,
            "extra": {"peer": self.peer} if self.peer else {},
        }

    def declared_growth(self) -> float:
        if self.mode == "decode":
            return 1.0  # one step over a context of T: at most linear in T
        if self.kind == "peer" or self.path == "reference":
            return 2.0  # references materialise scores; peers declare nothing
        return growth_from_complexity(REGISTRY.get(self.mechanism).complexity.time, self.path)

    def calls(self) -> int:
        return 3 + self.runs

    def measure(self, threads: int, budget: Budget) -> dict[str, Any]:
        torch.manual_seed(SEED)
        if self.kind == "decode":
            return _measure_decode(self, threads, budget)
        return _measure_speed(self, threads, budget)


def _peak_bytes(fn: Callable[[], object], device: str) -> int:
    if not device.startswith("cuda"):
        return call_peak_bytes(fn)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return max(0, torch.cuda.max_memory_allocated() - base)


def _forward(case: Case, mechanism: str, path: str, options: dict, q, k, v) -> tuple[Callable[[], object], Any]:
    """The timed closure of an attnkit mechanism (forward, plus backward for fwdbwd) and the module."""
    grad = case.mode == "fwdbwd"
    mech = create(mechanism, heads=case.heads, head_dim=case.head_dim, **options).to(case.device)
    grid = case.spatial_shape if mech.spatial else None  # the SDPA baseline of a spatial case takes no grid

    def call():
        with torch.set_grad_enabled(grad):
            out = mech(q, k, v, pattern=case.pattern, path=path, spatial_shape=grid)
            if grad:
                out.backward(torch.ones_like(out))
        return out

    return call, mech


def _measure_speed(case: Case, threads: int, budget: Budget) -> dict[str, Any]:
    grad = case.mode == "fwdbwd"
    q, k, v = make_qkv(case.batch, case.tq, case.tk, case.heads, case.kv_heads, case.head_dim,
                       dtype=getattr(torch, case.dtype), device=case.device, requires_grad=grad)  # fmt: skip
    if case.kind == "peer":
        fn, flops = peer_call(case, q, k, v)
        path = lambda: case.peer or "?"  # noqa: E731
    else:
        fn, mech = _forward(case, case.mechanism, case.path, case.options, q, k, v)
        flops = mech.flops(case.shape(), as_pattern(case.pattern)) * (BACKWARD_FLOP_FACTOR if grad else 1.0)
        path = lambda: mech.last_path or "?"  # noqa: E731
    peak = _peak_bytes(fn, case.device)  # the subject alone, before its baseline exists; also a warm-up
    baseline = None if case.is_sdpa else _forward(case, "softmax", "sdpa", {}, q, k, v)[0]
    paired = time_paired(fn, baseline, threads=threads, budget_s=budget.timing_s, limit_s=budget.time_s,
                         min_rounds=case.runs)  # fmt: skip
    t = paired.subject
    return {
        "status": "ok",
        "path": path(),
        **_timing_columns(paired),
        "peak_bytes": peak,
        "flops": flops,
        "gflops": flops / (t.median_ms * 1e-3) / 1e9,
    }


def _decoder(case: Case, mechanism: str, options: dict, q, k, v, calls: int):
    """Prefill ``case.tokens`` tokens, then each call decodes the next one and keeps the new state (as a
    real decoder does, so KV caches append in place). Returns the step and the prefilled state's bytes."""
    mech = create(mechanism, heads=case.heads, head_dim=case.head_dim, **options).to(case.device)
    t = case.tokens
    with torch.no_grad():
        _, state = mech(q[:, :t], k[:, :t], v[:, :t], pattern="causal_self", return_state=True)
    prefilled = state.nbytes
    pos = t

    def step():
        nonlocal state, pos
        if pos >= t + calls:
            raise RuntimeError("decode benchmark ran out of prepared tokens")
        sl = slice(pos, pos + 1)
        with torch.no_grad():
            out, state = mech(q[:, sl], k[:, sl], v[:, sl], pattern="causal_self", state=state, return_state=True)
        pos += 1
        return out

    return step, mech, prefilled


def decode_calls(tokens: int) -> int:
    """Decoding steps a decode case may take: the context grows from T to at most 1.25 T (or T + 128)."""
    return max(128, tokens // 4)


def _measure_decode(case: Case, threads: int, budget: Budget) -> dict[str, Any]:
    calls = decode_calls(case.tokens)
    total = case.tokens + calls
    q, k, v = make_qkv(case.batch, total, total, case.heads, case.kv_heads, case.head_dim,
                       dtype=getattr(torch, case.dtype), device=case.device)  # fmt: skip
    step, mech, state_bytes = _decoder(case, case.mechanism, case.options, q, k, v, calls)
    peak = _peak_bytes(step, case.device)
    baseline = None
    if case.mechanism != "softmax":
        baseline = _decoder(case, "softmax", {}, q, k, v, calls)[0]
    left = calls - 1  # the memory probe took one token
    paired = time_paired(step, baseline, threads=threads, budget_s=budget.timing_s, limit_s=budget.time_s,
                         min_rounds=case.runs,
                         max_calls=left, block_s=DECODE_BLOCK_S)  # fmt: skip
    return {
        "status": "ok",
        "path": mech.last_path or "?",
        **_timing_columns(paired),
        "peak_bytes": peak,
        "state_bytes": state_bytes,
    }


def _timing_columns(paired) -> dict[str, Any]:
    t, base = paired.subject, paired.baseline
    return {
        "median_ms": t.median_ms,
        "iqr_ms": t.iqr_ms,
        "min_ms": t.min_ms,
        "runs": t.runs,
        "rounds": t.rounds,
        "baseline_ms": base.median_ms if base else t.median_ms,
        "speedup": paired.speedup if base else 1.0,
        # not stored as columns: the sweep turns them into the row's doubts
        "spread": t.spread,
        "speedup_spread": paired.speedup_spread,
    }
