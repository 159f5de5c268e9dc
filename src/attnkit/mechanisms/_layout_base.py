"""Shared base of the exact fixed-sparse mechanisms whose mask is a predicate (block_sparse, dilated).

A subclass says which keys each query sees as a mask predicate ``pred(b, h, q_idx, kv_idx)``
(:meth:`mask_predicate`) and, for the fast path, a tile rule that answers the same question for whole
tiles from their position spans (:meth:`tile_rule`) plus how tokens are laid out in tiles
(:meth:`tiling`). The reference turns the predicate into a dense mask; the ``blocked`` path turns the
rule into a block layout (cached per lengths, offset, heads and device) and runs
``ops.block_layout.block_sparse_attention`` over it. Both compute softmax under exactly that mask.

Positions count real tokens. The masks are not translation invariant (blocks, residues, a band in cross
patterns), so padding must not move them: with a key padding mask, each batch row's padded tokens are
removed before attending (keys; in self patterns the queries at padded positions too, whose output is
zero: a padded position is no token), and positions are ranks among the row's real tokens (a KV cache
keeps the mask, so chunked calls rank alike). Both paths do this, one batch row at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..inputs import AttentionInputs
from ..mechanism import Mechanism, Shape, fast_path
from ..ops.block_layout import (
    LayoutCache,
    TileLayout,
    TileRule,
    Tiling,
    block_sparse_attention,
    layout_from_rule,
    visible_pairs,
)
from ..ops.reference import dense_softmax_attention, zeros_in_graph
from ..patterns import MaskPredicate, Pattern
from ..state import KVCache


class LayoutAttention(Mechanism):
    """Softmax attention under a mask predicate, with a block-sparse fast path."""

    exact = True
    state_kind = KVCache

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._layouts = LayoutCache()

    # ---- what a subclass defines --------------------------------------------------------------------

    def mask_predicate(self, pattern: Pattern | str, tk: int | None = None) -> MaskPredicate:
        """``pred(b, h, q_idx, kv_idx)``: may the query at key position q_idx (head h) see key kv_idx?
        ``tk`` is the call's number of keys (only cross-pattern random choices read it)."""
        raise NotImplementedError

    def tile_rule(self, pattern: Pattern, tk: int) -> TileRule:
        """The predicate for whole tiles: ``(h, q_lo, q_hi, kv_lo, kv_hi) -> (maybe_any, surely_all)``."""
        raise NotImplementedError

    def tiling(self, tq: int, tk: int, q_offset: int, device: torch.device | str) -> Tiling:
        """How queries (at key positions q_offset ...) and keys are laid out in tiles for the blocked path."""
        raise NotImplementedError

    def head_dependent(self) -> bool:
        """Whether the predicate reads the head index (then the layout has one entry per query head)."""
        return False

    def layout_key(self) -> tuple:
        """What besides the call's sizes the layout depends on (options; a seed)."""
        return (self.options,)

    # ---- paths --------------------------------------------------------------------------------------

    def reference(self, x: AttentionInputs):
        # softmax over the keys the predicate and the pattern allow, as a dense [B, H, Tq, Tk] mask
        dense = lambda y: dense_softmax_attention(y, self.mask_predicate(y.pattern, y.tk))  # noqa: E731
        return over_real_tokens(x, dense), None

    def tiled_layout(self, x: AttentionInputs) -> tuple[Tiling, TileLayout]:
        """The call's tiling and block layout (cached: a decoding step's offset makes a new, small one)."""
        heads = x.heads if self.head_dependent() else 1
        key = (self.layout_key(), x.pattern, x.tq, x.tk, x.q_offset, heads, str(x.q.device))

        def make() -> tuple[Tiling, TileLayout]:
            tiling = self.tiling(x.tq, x.tk, x.q_offset, x.q.device)
            return tiling, layout_from_rule(self.tile_rule(x.pattern, x.tk), tiling, heads)

        return self._layouts.get(key, make)

    @fast_path("blocked", priority=10)
    def blocked(self, x: AttentionInputs):
        return over_real_tokens(x, self._blocked_unpadded), None

    def _blocked_unpadded(self, x: AttentionInputs) -> torch.Tensor:
        tiling, layout = self.tiled_layout(x)
        pred = self.mask_predicate(x.pattern, x.tk)
        return block_sparse_attention(x.q, x.k, x.v, tiling=tiling, layout=layout, pred=pred, scale=x.scale)

    # ---- cost ---------------------------------------------------------------------------------------

    def visible_pairs(self, shape: Shape, pattern: Pattern) -> int:
        """Visible (query, key) pairs of one call, summed over the query heads (exact; no padding)."""
        heads = shape.heads if self.head_dependent() else 1
        tiling = self.tiling(shape.tq, shape.tk, 0, "cpu")
        layout = layout_from_rule(self.tile_rule(pattern, shape.tk), tiling, heads)
        return visible_pairs(self.mask_predicate(pattern, shape.tk), tiling, layout) * (shape.heads // heads)

    def flops(self, shape: Shape, pattern: Pattern) -> float:
        return 2.0 * shape.batch * self.visible_pairs(shape, pattern) * (shape.dk + shape.dv)


def over_real_tokens(x: AttentionInputs, attend: Callable[[AttentionInputs], torch.Tensor]) -> torch.Tensor:
    """``attend(x)`` with positions counted over real tokens: without padding, ``attend(x)`` itself; with a key
    padding mask, per batch row, ``attend`` on the row's real keys (and, in self patterns, the queries at
    real positions, the first at the rank of its position), scattered back; other query rows are zero."""
    kpm = x.key_padding_mask
    if kpm is None:
        return attend(x)
    out = zeros_in_graph(x)  # [B, Tq, Hq, Dv]; rows that see nothing stay 0 and backward still runs
    for b in range(x.batch):
        keys = torch.nonzero(kpm[b]).view(-1)  # real keys, in order: their rank is their position
        if x.pattern.is_self:
            rows = torch.nonzero(kpm[b, x.q_offset :]).view(-1)  # queries at real positions
            offset = int(kpm[b, : x.q_offset].sum())  # real tokens before this call (a KV cache's)
        else:
            rows, offset = torch.arange(x.tq, device=kpm.device), 0
        if keys.numel() == 0 or rows.numel() == 0:
            continue  # nothing to see: zeros
        row = x.replace(
            q=x.q[b : b + 1, rows],
            k=x.k[b : b + 1, keys],
            v=x.v[b : b + 1, keys],
            key_padding_mask=None,
            q_offset=offset,
        )
        out[b, rows] = attend(row)[0]
    return out
