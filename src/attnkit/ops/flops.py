"""Shared pieces of the mechanisms' FLOP formulas (``Mechanism.flops``, used by the benchmark)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..patterns import Pattern

if TYPE_CHECKING:
    from ..mechanism import Shape


def causal_factor(shape: Shape, pattern: Pattern) -> float:
    """Share of (query, key) pairs a causal call computes, ~1/2 (FlashAttention's FLOP convention)."""
    return 0.5 if pattern is Pattern.CAUSAL_SELF else 1.0
