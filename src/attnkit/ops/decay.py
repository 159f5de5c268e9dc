"""Per-head decays: checking and expanding per-head options, and ALiBi's head slopes.

Used by the decay family (retention, lightning) and by positional biases (kernel_rpe_fft's ALiBi init).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..errors import InvalidOption


def check_per_head(mechanism: str, name: str, value: Any, *, low: float, high: float, open_low: bool) -> None:
    """A per-head tuple option: None, or a non-empty sequence of numbers in (low, high] / [low, high] (one
    per query head, or one for every head)."""
    if value is None:
        return
    ok = isinstance(value, tuple | list) and len(value) > 0
    for g in value if ok else ():
        good = isinstance(g, int | float) and not isinstance(g, bool) and math.isfinite(g)
        ok = ok and good and (g > low if open_low else g >= low) and g <= high
    if not ok:
        side = "(" if open_low else "["
        raise InvalidOption(
            f"{mechanism} option {name}={value!r} is not valid; expected numbers in {side}{low}, {high}], one per "
            "query head or one for all heads, or None"
        )


def per_head(mechanism: str, name: str, values: tuple[float, ...], heads: int) -> torch.Tensor:
    """A per-head option's values for ``heads`` query heads (a single value serves every head), float64."""
    if len(values) not in (1, heads):
        raise InvalidOption(f"{mechanism} option {name} has {len(values)} values but q has {heads} heads")
    return torch.tensor(values, dtype=torch.float64).expand(heads)


def alibi_slopes(heads: int) -> list[float]:
    """ALiBi's head slopes: the geometric sequence 2^(-8(h+1)/H) when H is a power of two; otherwise
    those of the power of two below H, then every other slope of the power of two above it."""
    if math.log2(heads).is_integer():
        start = 2.0 ** (-8.0 / heads)
        return [start ** (h + 1) for h in range(heads)]
    below = 2 ** math.floor(math.log2(heads))
    return alibi_slopes(below) + alibi_slopes(2 * below)[0::2][: heads - below]
