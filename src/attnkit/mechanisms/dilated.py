"""Dilated attention — Dilated Neighborhood Attention Transformer (Hassani & Shi, 2022, arXiv:2209.15001)
on 1-D sequences, and S2-Attention's heterogeneous context sharding (Lin et al., 2024, arXiv:2407.17678).

With dilation r, window W (dilated neighbours per side) and d = i - j (query position i, key position j):

    homogeneous (DiNAT):       visible(h, i, j) = d mod r == 0       and |d| <= W·r
    heterogeneous (S2-Attn):   visible(h, i, j) = j mod r == h mod r and |d| <= W·r
    either, plus a dense band:  or |d| < local;   causal_self adds d >= 0;  out_i = softmax over visible keys

Choices where the papers leave room:
- ``window=None`` means the whole context (every key of the right residue); a window counts dilated
  neighbours per side, so a query sees at most 2W + 1 keys of its dilation set (W + 1 when causal).
- heterogeneous heads use the query head's index: head h reads the keys of residue h mod r, so any r
  consecutive heads cover every key together (S2-Attention's sharding). A query of head h that sees no key of
  that residue (causal, i < h mod r, without a local band) outputs zeros.
- ``local`` is S2-Attention's dense local band kept by every head (0: none); DiNAT has none.
- 1-D only, no boundary shift of the neighbourhood near the sequence ends (DiNAT's 2-D windows shift to keep
  a constant size; here the window is cut at the ends instead, like sliding_window).

The ``blocked`` path sorts queries and keys by position mod r (r shards), lays each shard in tiles of
``block`` tokens and visits, per query tile, only the key tiles with a visible key (its own shard, or its
head's; the local band's neighbours in the others): O(T²/r·D) time per head without a window,
O(T·(W + local)·D) with one, gathered keys bounded per chunk of tiles. Decoding keeps a KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InvalidOption
from ..mechanism import Complexity, Paper, register_mechanism
from ..ops.block_layout import Tiling, residue_tiling
from ..options import MAX_TOKENS, check_int
from ..patterns import MaskPredicate, Pattern, as_pattern
from ._layout_base import LayoutAttention

_FAR = 1 << 40  # "no window": farther than any position difference


@dataclass(frozen=True)
class DilatedOptions:
    dilation: int = 4  # r: keys at distances that are multiples of r (heterogeneous: keys j = h mod r)
    window: int | None = None  # dilated neighbours per side (|i - j| <= window * r); None: the whole context
    heterogeneous: bool = False  # S2-Attention: head h sees keys j = h (mod r) instead of distances = 0 (mod r)
    local: int = 0  # dense band every head keeps: keys at distance < local (0: none)
    block: int = 256  # tokens per tile of the blocked path, at most a shard's length rounded up to 8 (speed only)

    def __post_init__(self):
        check_int("dilated", "dilation", self.dilation, maximum=MAX_TOKENS)
        if self.window is not None:
            check_int("dilated", "window", self.window, minimum=0)
        if not isinstance(self.heterogeneous, bool):
            raise InvalidOption(
                f"dilated option heterogeneous={self.heterogeneous!r} is not valid; expected True or False"
            )
        check_int("dilated", "local", self.local, minimum=0, maximum=MAX_TOKENS)
        check_int("dilated", "block", self.block)


@register_mechanism("dilated")
class Dilated(LayoutAttention):
    family = "fixed sparse"
    paper = Paper("Dilated Neighborhood Attention Transformer", 2022, "2209.15001")
    patterns = frozenset({Pattern.NONCAUSAL_SELF, Pattern.CAUSAL_SELF})
    complexity = Complexity(time="O(T²/r·D) (window W: O(T·(W+local)·D))", memory="O(T) + a bounded gather")
    Options = DilatedOptions
    example_options = (
        {"dilation": 3, "block": 4},
        {"dilation": 4, "window": 3, "heterogeneous": True, "local": 2, "block": 8},
    )
    fidelity_knob = ("dilation", (2, 4, 8))

    def head_dependent(self) -> bool:
        return self.options.heterogeneous

    def _reach(self) -> int:
        o = self.options
        return _FAR if o.window is None else o.window * o.dilation

    def mask_predicate(self, pattern: Pattern | str, tk: int | None = None) -> MaskPredicate:
        o, causal, reach = self.options, as_pattern(pattern) is Pattern.CAUSAL_SELF, self._reach()

        def pred(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
            d = q_idx - kv_idx
            shard = (kv_idx % o.dilation == h % o.dilation) if o.heterogeneous else (d % o.dilation == 0)
            vis = shard & (d.abs() <= reach)
            if o.local:
                vis = vis | (d.abs() < o.local)
            return vis & (d >= 0) if causal else vis

        return pred

    def tile_rule(self, pattern: Pattern, tk: int):
        # every tile holds one residue class, its positions spaced r apart (residue_tiling): the position
        # differences of a tile pair fill [q_lo - kv_hi, q_hi - kv_lo] in steps of r
        o, causal, reach = self.options, pattern is Pattern.CAUSAL_SELF, self._reach()

        def rule(h, q_lo, q_hi, kv_lo, kv_hi):
            dmin, dmax = q_lo - kv_hi, q_hi - kv_lo

            def within(lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:  # (may meet, lies inside)
                return (dmax >= lo) & (dmin <= hi), (dmin >= lo) & (dmax <= hi)

            same = (
                (kv_lo % o.dilation == h % o.dilation) if o.heterogeneous else (q_lo % o.dilation == kv_lo % o.dilation)
            )
            meet, inside = within(0 if causal else -reach, reach)
            maybe_any, surely_all = same & meet, same & inside
            if o.local:
                meet, inside = within(0 if causal else 1 - o.local, o.local - 1)
                maybe_any, surely_all = maybe_any | meet, surely_all | inside
            return maybe_any, surely_all

        return rule

    def tiling(self, tq: int, tk: int, q_offset: int, device) -> Tiling:
        # large tiles gather each shard's keys fewer times; no larger than a shard, so short calls pad little
        shard = -(-max(tq, tk) // self.options.dilation)
        block = min(self.options.block, -(-shard // 8) * 8)
        return residue_tiling(tq, tk, block, q_offset, self.options.dilation, device)
