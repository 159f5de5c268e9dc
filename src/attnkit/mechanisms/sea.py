"""SEA — SEA: Sparse Linear Attention with Estimated Attention Mask (Lee et al., 2023, arXiv:2310.01777).

A kernel (linear-attention) estimate of the attention matrix picks, per query, the key blocks that matter;
exact softmax attention then runs over the keys of those blocks only:

    est_{i,c} = phi(q_i) . sum_{j in block c, j visible to i} phi(k_j),     phi(x) = elu(sqrt(scale) x) + 1
    S_i = top-k blocks c by est_{i,c};   out_i = sum_{j in S_i, visible} softmax_j(scale q_i . k_j) v_j

Choices where the paper leaves room (or where its choice would depend on the length):
- The paper decodes a Performer output into a compressed T x K attention estimate (K fixed, so a column
  spans T/K keys, which changes with T) with a small CNN; here a column is a fixed block of ``block_size``
  keys and the estimate is the linear-attention mass phi(q_i) . Phi_c of the block, with no learned decoder.
- elu + 1 features (Katharopoulos et al.) instead of random ones: deterministic, nothing to seed.
- ``topk`` is a per-query count of blocks (never a fraction of T); ties go to the later block.
- noncausal_self: the mask is chosen per query block (``block_size`` queries share their top-k key blocks by
  the block's summed estimate sum_{i in Q} phi(q_i) . Phi_c), a block-sparse mask: one gather per block.
- causal_self: per query (a query block would mix in later queries): only blocks holding a key <= i compete,
  and the query's own block is estimated from its keys <= i (a within-block prefix sum), so nothing after i
  reaches the selection or the softmax.
- Blocks are counted over real (unpadded) keys, so key padding does not move them (``_routed_blocks``).
Cost: the noncausal estimate is O((T/bs)^2 * D), the causal one O(T * T/bs * D) (a T x T/bs matrix, bs times
cheaper than the scores of softmax); the attention O(T * topk * block_size * D).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..inputs import AttentionInputs
from ..mechanism import Complexity, Paper, Shape, register_mechanism
from ..ops.topk_sparse import RankLayout, block_reduce, order_key, select_top
from ..options import check_int
from ..patterns import Pattern
from ._routed_blocks import RoutedBlocks


@dataclass(frozen=True)
class SEAOptions:
    topk: int = 4  # key blocks each query attends to (a count, not a fraction of T)
    block_size: int = 32  # keys per block: one column of the estimated attention matrix

    def __post_init__(self):
        check_int("sea", "topk", self.topk)
        check_int("sea", "block_size", self.block_size)


@register_mechanism("sea")
class SEA(RoutedBlocks):
    family = "sparse, estimated"
    heads_independent = True
    paper = Paper("SEA: Sparse Linear Attention with Estimated Attention Mask", 2023, "2310.01777")
    complexity = Complexity(
        time="O(T·topk·block·D) + estimate O(T·(T/block)·D) causal, O((T/block)²·D) noncausal",
        memory="O(T·topk·(D+block) + T·T/block)",
    )
    Options = SEAOptions
    example_options = ({"topk": 3, "block_size": 4}, {"topk": 2, "block_size": 16})
    fidelity_knob = ("topk", (2, 4, 8, 16))

    def block_size(self) -> int:
        return self.options.block_size

    def topk(self) -> int:
        return self.options.topk

    @staticmethod
    def features(t: torch.Tensor, scale: float) -> torch.Tensor:
        """phi(x) = elu(sqrt(scale) x) + 1 (positive, so sums of features estimate attention mass)."""
        return F.elu(t * math.sqrt(scale)) + 1

    def block_scores(self, q, k, real, x):
        bs = self.options.block_size
        phi_q, _ = block_reduce(self.features(q, x.scale), real, bs, mean=False)  # [B, H, nQ, D]
        phi_k, _ = block_reduce(self.features(k, x.scale), real, bs, mean=False)  # [B, H, nK, D]
        return phi_q @ phi_k.transpose(-1, -2)  # [B, H, nQ, nK]: estimated attention mass

    def causal_selection(self, x: AttentionInputs, layout: RankLayout):
        bs = self.options.block_size
        q, k, real = self.ranked_qk(x, layout)
        phi_q = self.features(q, x.scale)  # [B, H, Tq, D]
        phi_k = torch.where(real[:, None, :, None], self.features(k, x.scale), 0.0)  # [B, H, Tk, D]
        nb = -(-x.tk // bs)
        phi_k = F.pad(phi_k, (0, 0, 0, nb * bs - x.tk)).unflatten(2, (nb, bs))  # [B, H, nb, bs, D]
        est = phi_q @ phi_k.sum(3).transpose(-1, -2)  # [B, H, Tq, nb]
        rank = layout.q_rank[:, None, :, None]  # [B|1, 1, Tq, 1]: the query's rank (-1: sees no key)
        within = phi_k.cumsum(3).flatten(2, 3)  # [B, H, nb*bs, D]: block sums up to each rank
        upto = within.gather(2, rank.clamp_min(0).expand(*phi_q.shape[:3], 1).expand_as(phi_q))
        block = torch.arange(nb, device=est.device)
        own = rank.clamp_min(0) // bs
        est = torch.where(block == own, (phi_q * upto).sum(-1, keepdim=True), est)  # own block: keys <= i
        visible = (block <= own) & (rank >= 0)
        return select_top(order_key(est, block, visible), self.options.topk)

    def flops(self, shape: Shape, pattern: Pattern) -> float:
        bs, topk = self.options.block_size, self.options.topk
        nb = -(-shape.tk // bs)
        rows = shape.tq if pattern is Pattern.CAUSAL_SELF else -(-shape.tq // bs)
        estimate = 2.0 * rows * nb * shape.dk  # phi(q) (or its block sums) against the key block sums
        attend = 2.0 * shape.tq * min(topk * bs, shape.tk) * (shape.dk + shape.dv)
        return shape.batch * shape.heads * (estimate + attend)
