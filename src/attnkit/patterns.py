"""The four attention patterns (CAB's taxonomy) and the mask predicates built on them.

A mask predicate follows attention-gym (FlexAttention's ``mask_mod``): ``pred(b, h, q_idx, kv_idx) -> bool``,
True where the query at ``q_idx`` (a position *in key coordinates*) may see the key at ``kv_idx``, for
batch row ``b`` and query head ``h``. The same predicate is evaluated on broadcastable index tensors
(``b [B,1,1,1]``, ``h [1,H,1,1]``, ``q_idx [1,1,Tq,1]``, ``kv_idx [1,1,1,Tk]``) for the dense masks of
references, by ``ops/block_layout`` for the block layouts of fast paths, and can be handed to
FlexAttention's ``create_block_mask`` as it is. Predicates use elementwise tensor operations only (no
Python branching on index values) and compose with :func:`and_masks`.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum

import torch

from .errors import InvalidOption, did_you_mean

# (b, h, q_idx, kv_idx) -> bool
MaskPredicate = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class Pattern(str, Enum):
    """Who may attend to whom. Every function also accepts the string values."""

    NONCAUSAL_SELF = "noncausal_self"  # every token sees all tokens of its sequence
    CAUSAL_SELF = "causal_self"  # token i sees tokens <= i
    NONCAUSAL_CROSS = "noncausal_cross"  # queries see a separate context
    CAUSAL_CROSS = "causal_cross"  # queries come one by one, each sees the whole context

    def __str__(self) -> str:
        return self.value

    @property
    def is_self(self) -> bool:
        return self in (Pattern.NONCAUSAL_SELF, Pattern.CAUSAL_SELF)

    @property
    def is_causal(self) -> bool:
        return self in (Pattern.CAUSAL_SELF, Pattern.CAUSAL_CROSS)

    @property
    def short(self) -> str:
        """CAB's two-letter code: NS, CS, NC, CC."""
        return {"noncausal_self": "NS", "causal_self": "CS", "noncausal_cross": "NC", "causal_cross": "CC"}[self.value]


ALL_PATTERNS = frozenset(Pattern)


def as_pattern(pattern: Pattern | str) -> Pattern:
    """Turn a string or Pattern into a Pattern, with a helpful error for anything else."""
    if isinstance(pattern, Pattern):
        return pattern
    try:
        return Pattern(pattern)
    except ValueError:
        valid = [p.value for p in Pattern]
        raise InvalidOption(
            f"unknown pattern {pattern!r}; expected one of {', '.join(valid)}.{did_you_mean(str(pattern), valid)}"
        ) from None


# ---- mask predicates ------------------------------------------------------------------------------


def causal(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
    """Key j is visible to the query at key position i when j <= i."""
    return kv_idx <= q_idx


def window(size: int, *, causal: bool) -> MaskPredicate:
    """Keys at distance < size: the last `size` keys (causal) or |i - j| < size (noncausal)."""

    def pred(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        dist = q_idx - kv_idx
        return (dist >= 0) & (dist < size) if causal else dist.abs() < size

    return pred


def and_masks(*preds: MaskPredicate | None) -> MaskPredicate | None:
    """The predicate that holds where all given predicates hold (None entries are ignored)."""
    preds = tuple(p for p in preds if p is not None)
    if not preds:
        return None

    def pred(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        out = preds[0](b, h, q_idx, kv_idx)
        for p in preds[1:]:
            out = out & p(b, h, q_idx, kv_idx)
        return out

    return pred


def pattern_predicate(pattern: Pattern) -> MaskPredicate | None:
    """The positional restriction a pattern imposes; None means every key is visible.

    Causal cross attention restricts nothing on the key side: its contract is that no information
    flows between queries, which query-independent mechanisms satisfy by construction.
    """
    return causal if pattern is Pattern.CAUSAL_SELF else None


def or_masks(*preds: MaskPredicate) -> MaskPredicate:
    """The predicate that holds where any of the given predicates holds (global tokens OR a band...)."""
    if not preds:
        raise ValueError("or_masks needs at least one predicate")

    def pred(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        out = preds[0](b, h, q_idx, kv_idx)
        for p in preds[1:]:
            out = out | p(b, h, q_idx, kv_idx)
        return out

    return pred


def dense_mask(
    pred: MaskPredicate | None,
    tq: int,
    tk: int,
    *,
    q_offset: int = 0,
    batch: int = 1,
    heads: int = 1,
    device: torch.device | None = None,
) -> torch.Tensor | None:
    """The bool mask ``[B|1, H|1, Tq, Tk]`` of a predicate; query i sits at key position ``i + q_offset``.

    The batch and head axes have size 1 unless the predicate depends on ``b`` or ``h``.
    """
    if pred is None:
        return None
    b = torch.arange(batch, device=device).view(-1, 1, 1, 1)  # [B, 1, 1, 1]
    h = torch.arange(heads, device=device).view(1, -1, 1, 1)  # [1, H, 1, 1]
    q_idx = (torch.arange(tq, device=device) + q_offset).view(1, 1, -1, 1)  # [1, 1, Tq, 1]
    kv_idx = torch.arange(tk, device=device).view(1, 1, 1, -1)  # [1, 1, 1, Tk]
    m = torch.as_tensor(pred(b, h, q_idx, kv_idx), device=device)
    return m.expand(torch.broadcast_shapes(m.shape, (1, 1, tq, tk)))
