"""A quick speed table: every mechanism's fast path against SDPA softmax, same inputs, same run."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from ..api import create, mechanisms
from ..mechanism import Shape
from ..patterns import Pattern
from ..testing import make_qkv
from .timing import time_fn

log = logging.getLogger(__name__)

# the options each mechanism runs with in the table (defaults otherwise)
TABLE_OPTIONS: dict[str, dict] = {"sliding_window": {"window": 256}}


@dataclass(frozen=True)
class SpeedRow:
    mechanism: str
    path: str
    pattern: str
    tokens: int
    ms: float  # median forward latency
    sdpa_ms: float  # SDPA softmax on the same inputs and pattern
    gflops: float  # achieved, from the mechanism's flops()

    @property
    def speedup(self) -> float:
        return self.sdpa_ms / self.ms


def speed_table(
    lengths: list[int],
    *,
    names: str = "*",
    patterns: tuple[Pattern, ...] = (Pattern.NONCAUSAL_SELF, Pattern.CAUSAL_SELF),
    batch: int = 1,
    heads: int = 8,
    head_dim: int = 64,
    runs: int = 5,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: Callable[[int, int, str], None] | None = None,
) -> Iterator[SpeedRow]:
    """Time the forward pass of each mechanism's default path and of SDPA, interleaved per case."""
    cases = [
        (info.name, p, t)
        for info in mechanisms(names, kind="attention")
        if not info.trainable
        for p in patterns
        if p in info.patterns
        for t in lengths
    ]
    sdpa = create("softmax")
    for i, (name, pattern, t) in enumerate(cases):
        if progress:
            progress(i, len(cases), f"{name} {pattern.value} T={t}")
        mech = create(name, heads=heads, head_dim=head_dim, **TABLE_OPTIONS.get(name, {})).to(device)
        q, k, v = make_qkv(batch, t, t, heads, heads, head_dim, dtype=dtype, device=device)
        with torch.no_grad():
            mine = time_fn(lambda: mech(q, k, v, pattern=pattern), runs=runs, device=device)  # noqa: B023
            path = mech.last_path or "?"
            base = time_fn(lambda: sdpa(q, k, v, pattern=pattern), runs=runs, device=device)  # noqa: B023
        flops = mech.flops(Shape(batch, t, t, heads, heads, head_dim, head_dim), pattern)
        yield SpeedRow(name, path, pattern.value, t, mine.median_ms, base.median_ms, flops / mine.median_ms / 1e6)
    if progress:
        progress(len(cases), len(cases), "done")


def format_table(rows: list[SpeedRow]) -> str:
    head = f"{'mechanism':<16}{'path':<13}{'pattern':<16}{'T':>6}{'ms':>10}{'SDPA ms':>10}{'vs SDPA':>9}{'GFLOP/s':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.mechanism:<16}{r.path:<13}{r.pattern:<16}{r.tokens:>6}{r.ms:>10.1f}{r.sdpa_ms:>10.1f}"
            f"{r.speedup:>8.2f}x{r.gflops:>9.1f}"
        )
    return "\n".join(lines)
