"""Shared base of block-routed mechanisms (sea, bilevel_routing): pick key blocks by a cheap score, then
run exact softmax over the keys of the picked blocks.

Blocks of ``block_size`` consecutive real keys (counted over unpadded keys, ``ops.topk_sparse.RankLayout``,
so padding moves no boundary). A subclass says how blocks are scored:

- noncausal_self: per *query block* (the same blocks of ``block_size`` real queries) ``block_scores`` gives a
  ``[nQ, nK]`` matrix; every query of a query block uses its top-k key blocks (ties: the later block).
- causal_self: per *query token* ``causal_selection`` gives its blocks (a query block would mix in later
  queries), using only keys the query sees.

Both paths call the same selection (one function, same inputs), and differ only in the attention over it:
the reference writes the selected keys out as a dense [Tq, Tk] mask; the ``routed`` path runs
``shared_candidate_attention`` (noncausal: one gather per query block) or ``routed_block_attention``
(causal: per-query blocks, grouped by block) from ``ops/topk_sparse``, never building [Tq, Tk].
"""

from __future__ import annotations

import torch

from ..inputs import AttentionInputs
from ..mechanism import Mechanism, fast_path
from ..ops.gqa import repeat_kv
from ..ops.reference import compute_dtype, dense_softmax_attention
from ..ops.topk_sparse import (
    RankLayout,
    block_reduce,
    order_key,
    rank_layout,
    routed_block_attention,
    select_top,
    selected_block_mask,
    shared_candidate_attention,
)
from ..patterns import Pattern
from ..state import KVCache


class RoutedBlocks(Mechanism):
    """Base: subclasses define ``block_size``, ``topk``, ``block_scores`` and ``causal_selection``."""

    patterns = frozenset({Pattern.NONCAUSAL_SELF, Pattern.CAUSAL_SELF})
    exact = False
    state_kind = KVCache

    def block_size(self) -> int:
        raise NotImplementedError

    def topk(self) -> int:
        raise NotImplementedError

    def block_scores(self, q: torch.Tensor, k: torch.Tensor, real: torch.Tensor, x: AttentionInputs) -> torch.Tensor:
        """noncausal: ``[B, H, nQ, nK]`` scores of query blocks against key blocks, from fp32 ``q, k [B, H, T, D]``
        in rank order (``real [B|1, T]`` marks real rows; q and k rows share it in self patterns)."""
        raise NotImplementedError

    def causal_selection(self, x: AttentionInputs, layout: RankLayout) -> tuple[torch.Tensor, torch.Tensor]:
        """causal: per query (blocks, valid) ``[B, H, Tq, m]``, using only keys at ranks <= the query's rank."""
        raise NotImplementedError

    # ---- the one selection --------------------------------------------------------------------------

    def ranked_qk(self, x: AttentionInputs, layout: RankLayout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Detached fp32 q (self patterns: rank order too) and k (repeated to q's heads), ``[B, H, T, D]``, and
        the real-row mask ``[B|1, T]`` of the rank order (selection takes no gradient)."""
        cdt = compute_dtype(x.q.dtype)
        k = layout.compact(repeat_kv(x.k.detach(), x.groups)).to(cdt).transpose(1, 2)
        q = x.q.detach().to(cdt)
        if x.pattern is not Pattern.CAUSAL_SELF:
            q = layout.compact(q)
        return q.transpose(1, 2), k, layout.real_ranks(x.tk, x.k.device)

    def noncausal_selection(self, x: AttentionInputs, layout: RankLayout) -> tuple[torch.Tensor, torch.Tensor]:
        """Per query block of the rank order: (blocks, valid) ``[B, H, nQ, topk]``."""
        q, k, real = self.ranked_qk(x, layout)
        scores = self.block_scores(q, k, real, x)  # [B, H, nQ, nK]
        _, counts = block_reduce(k[..., :1], real, self.block_size(), mean=False)  # [B|1, 1, nK]
        nk = scores.shape[-1]
        block = torch.arange(nk, device=scores.device)
        return select_top(order_key(scores, block, (counts > 0)[:, :, None, :]), self.topk())

    def query_blocks(self, x: AttentionInputs, layout: RankLayout) -> torch.Tensor:
        """noncausal: the query block of each query, ``[B|1, Tq]`` (its place in the rank order // block_size)."""
        slot = torch.arange(x.tq, device=x.q.device)[None]
        if layout.order is not None:
            slot = torch.empty_like(layout.order).scatter_(1, layout.order, slot.expand_as(layout.order))
        return slot // self.block_size()

    # ---- paths -------------------------------------------------------------------------------------

    def reference(self, x: AttentionInputs):
        layout = rank_layout(x)
        bs = self.block_size()
        if x.pattern is Pattern.CAUSAL_SELF:
            blocks, valid = self.causal_selection(x, layout)  # [B, H, Tq, m]
        else:
            blocks, valid = self.noncausal_selection(x, layout)  # [B, H, nQ, m]
            qb = self.query_blocks(x, layout)[:, None, :, None]  # [B|1, 1, Tq, 1]
            take = qb.expand(blocks.shape[0], blocks.shape[1], -1, blocks.shape[-1])
            blocks, valid = blocks.gather(2, take), valid.gather(2, take)  # [B, H, Tq, m]
        key_block = torch.where(layout.key_rank >= 0, layout.key_rank // bs, -1)  # [B|1, Tk]
        chosen = selected_block_mask(blocks, valid, key_block, -(-x.tk // bs))  # [B, H, Tq, Tk]

        def in_selected_blocks(b, h, q_idx, kv_idx):
            return chosen[b, h, q_idx - x.q_offset, kv_idx]

        return dense_softmax_attention(x, in_selected_blocks), None

    @fast_path("routed", priority=10)
    def routed(self, x: AttentionInputs):
        layout = rank_layout(x)
        bs = self.block_size()
        k, v = layout.compact(x.k), layout.compact(x.v)
        if x.pattern is Pattern.CAUSAL_SELF:
            blocks, valid = self.causal_selection(x, layout)
            out = routed_block_attention(
                x.q, k, v, blocks, valid, block_size=bs, scale=x.scale, q_pos=layout.q_rank, n_real=layout.n_real
            )
            return out, None
        blocks, valid = self.noncausal_selection(x, layout)  # [B, H, nQ, m]
        b, h, nq, m = blocks.shape
        cand = (blocks[..., None] * bs + torch.arange(bs, device=blocks.device)).flatten(-2)  # [B, H, nQ, m*bs]
        allowed = valid[..., None].expand(b, h, nq, m, bs).flatten(-2)
        if layout.n_real is not None:
            allowed = allowed & (cand < layout.n_real[:, None, None, None])
        q = layout.compact(x.q)  # queries in rank order, so that a query block is contiguous
        out = shared_candidate_attention(q, k, v, cand, allowed[..., None, :], scale=x.scale, query_block=bs)
        return layout.restore(out), None
