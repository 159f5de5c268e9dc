"""What a mechanism declares about itself: its paper, complexity, the sizes of a call, and its info card.

Plain data, kept apart from ``mechanism.py`` (the base class and dispatch); importable from either.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from .patterns import Pattern


@dataclass(frozen=True)
class Paper:
    title: str
    year: int
    arxiv: str | None = None

    def __str__(self) -> str:
        return f"{self.title} ({self.year}" + (f", arXiv:{self.arxiv})" if self.arxiv else ")")


@dataclass(frozen=True)
class Complexity:
    time: str  # e.g. "O(T²·D)"
    memory: str  # extra memory beyond inputs and outputs, e.g. "O(T)"

    def __str__(self) -> str:
        return f"time {self.time}, memory {self.memory}"


class Shape(NamedTuple):
    """Sizes of one call, for FLOP and state-size formulas."""

    batch: int
    tq: int
    tk: int
    heads: int
    kv_heads: int
    dk: int
    dv: int
    grid: tuple[int, ...] | None = None  # the queries' spatial_shape, when the call has one


@dataclass(frozen=True)
class MechanismInfo:
    name: str
    kind: str  # "attention" or "mixer"
    family: str
    paper: Paper
    patterns: frozenset[Pattern]
    exact: bool  # equals softmax attention up to rounding
    trainable: bool  # has parameters: build it with attnkit.create / attnkit.Attention
    supports_state: bool
    spatial: bool  # needs spatial_shape
    complexity: Complexity
    options: type  # the frozen options dataclass
    paths: tuple[str, ...]  # fast paths, in order of definition
    state_kind: str | None = None
    grid_dims: tuple[int, ...] = ()  # a sequence mechanism's grid form: the spatial_shape ranks that switch it on
    grid_patterns: frozenset[Pattern] = frozenset()  # the patterns that form supports
