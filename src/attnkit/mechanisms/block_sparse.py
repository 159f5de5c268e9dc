"""Block-sparse attention: global + local band + random blocks — Big Bird: Transformers for Longer Sequences
(Zaheer et al., 2020, arXiv:2007.14062), ETC-style global blocks; Longformer (Beltagy et al., 2020,
arXiv:2004.05150) is the special case without random blocks.

Tokens form blocks of ``block``; with query block a = i // block and key block c = j // block,

    visible(h, i, j) = |a - c| <= window_blocks  or  c < global_blocks  or  a < global_blocks
                       or  c in R(h, a)                                (and j <= i in causal_self)
    out_i = softmax_j over visible keys (scale q_i . k_j) v_j           (exact softmax under that mask)

Choices where the papers leave room:
- global blocks are the *first* ``global_blocks`` blocks (ETC-style, no extra tokens): every query sees
  them and their queries see every key; in causal_self they see only their past, like everyone.
- the random blocks R(h, a) of query block a in head h are ``random_blocks`` picks of a seeded integer
  hash of (seed, h, a, t), t < random_blocks: in causal_self ``hash mod a`` (a strictly past block, none for
  a = 0), so they never depend on the length of the call and truncated and chunked calls agree; in the other
  patterns ``hash mod nk`` with nk = ceil(Tk / block) key blocks (the whole context). Picks may coincide
  with each other or with band/global blocks (then a query sees fewer distinct blocks, as in a Bernoulli
  draw); the seed is drawn once per module (SeededDraws), ``redraw()`` draws new blocks.
- cross patterns: query block a and key block c are numbered from the start of their own sequences, so the
  band is the diagonal of the [Tq, Tk] block grid; causal_cross follows noncausal_cross (each query's keys
  depend on its own position only, so no information flows between queries).

The ``blocked`` path lays queries and keys in tiles of one block and visits only the tiles with a visible
key: O(T·(2w+1+g+r)·block·D) time and O(T·(2w+1+g+r)·block) memory for the non-global rows, plus
O(g·block·T) for the global query blocks. Decoding keeps a KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..mechanism import Complexity, Paper, register_mechanism
from ..ops.block_layout import Tiling, identity_tiling
from ..options import MAX_SEED, check_int
from ..patterns import ALL_PATTERNS, MaskPredicate, Pattern, as_pattern
from ._layout_base import LayoutAttention
from ._seeded import SeededDraws

_PRIME = 2147483647  # 2^31 - 1: the hash works modulo this prime, so no int64 product can overflow


@dataclass(frozen=True)
class BlockSparseOptions:
    block: int = 64  # tokens per block (the mask's granularity and the fast path's tile)
    global_blocks: int = 1  # the first blocks: seen by every query, and their queries see every key
    window_blocks: int = 1  # local band radius in blocks: query block a sees key blocks a-w ... a+w
    random_blocks: int = 2  # random key blocks per query block and head (causal: among its past blocks)
    seed: int | None = None  # random blocks come from this seed; None: a seed drawn at create

    def __post_init__(self):
        check_int("block_sparse", "block", self.block)
        check_int("block_sparse", "global_blocks", self.global_blocks, minimum=0)
        check_int("block_sparse", "window_blocks", self.window_blocks, minimum=0)
        check_int("block_sparse", "random_blocks", self.random_blocks, minimum=0, maximum=256)
        if self.seed is not None:
            check_int("block_sparse", "seed", self.seed, minimum=0, maximum=MAX_SEED)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """One round of an integer hash on [0, 2^31 - 1): multiply mod a prime, fold the high bits in."""
    x = (x * 48271) % _PRIME
    x = x ^ (x >> 13)
    return (x * 69621) % _PRIME


def random_block(salt: torch.Tensor, h: torch.Tensor, a: torch.Tensor, t: int) -> torch.Tensor:
    """A pseudo-random non-negative integer from (salt, head, query block, pick index): tensor ops only."""
    x = _mix((salt + h.long()) % _PRIME)
    x = _mix((x + a.long()) % _PRIME)
    return _mix((x + 7919 * (t + 1)) % _PRIME)


@register_mechanism("block_sparse")
class BlockSparse(SeededDraws, LayoutAttention):
    family = "fixed sparse"
    paper = Paper("Big Bird: Transformers for Longer Sequences", 2020, "2007.14062")
    patterns = ALL_PATTERNS
    complexity = Complexity(time="O(T·(2w+1+g+r)·block·D)", memory="O(T·(2w+1+g+r)·block)")
    Options = BlockSparseOptions
    example_options = (
        {"block": 4, "global_blocks": 1, "window_blocks": 1, "random_blocks": 2, "seed": 3},
        {"block": 16, "global_blocks": 2, "window_blocks": 0, "random_blocks": 1, "seed": 5},
    )
    fidelity_knob = ("window_blocks", (1, 2, 4))

    def salt(self) -> torch.Tensor:
        """The module's random draw: a 0-d int64 tensor in [0, 2^31 - 1) the block hash starts from."""
        return self.drawn("salt", lambda gen: torch.randint(0, _PRIME, (), generator=gen))

    def head_dependent(self) -> bool:
        return self.options.random_blocks > 0

    def layout_key(self) -> tuple:
        return (self.options, self.draw_seed)

    def block_visible(self, pattern: Pattern, tk: int):
        """``(h, a, c) -> bool``: may query block a see key block c in head h (before causality)?"""
        o, causal = self.options, pattern is Pattern.CAUSAL_SELF
        nk = -(-tk // o.block)  # key blocks of the context (random picks in the non-causal patterns)
        salt = self.salt()

        def visible(h: torch.Tensor, a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
            vis = ((a - c).abs() <= o.window_blocks) | (c < o.global_blocks) | (a < o.global_blocks)
            for t in range(o.random_blocks):
                pick = random_block(salt.to(a.device), h, a, t)
                pick = torch.where(a > 0, pick % a.clamp(min=1), -1) if causal else pick % nk
                vis = vis | (c == pick)
            return vis

        return visible

    def mask_predicate(self, pattern: Pattern | str, tk: int | None = None) -> MaskPredicate:
        pattern = as_pattern(pattern)
        visible, blk = self.block_visible(pattern, tk or 1), self.options.block
        causal = pattern is Pattern.CAUSAL_SELF

        def pred(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
            vis = visible(h, q_idx // blk, kv_idx // blk)
            return vis & (kv_idx <= q_idx) if causal else vis

        return pred

    def tile_rule(self, pattern: Pattern, tk: int):
        # tiles are whole blocks (identity tiling), so a tile pair is visible throughout or not at all,
        # except the diagonal of causal_self, which the predicate then decides
        visible, blk = self.block_visible(pattern, tk), self.options.block
        causal = pattern is Pattern.CAUSAL_SELF

        def rule(h, q_lo, q_hi, kv_lo, kv_hi):
            a, c = q_lo // blk, kv_lo // blk
            vis = visible(h, a, c)
            if not causal:
                return vis, vis
            return vis & (c <= a), vis & (c < a)

        return rule

    def tiling(self, tq: int, tk: int, q_offset: int, device) -> Tiling:
        return identity_tiling(tq, tk, self.options.block, q_offset, device)
