"""Bi-level routing attention — BiFormer: Vision Transformer with Bi-Level Routing Attention (Zhu et al., 2023,
arXiv:2303.08810), on 1-D sequences.

The sequence is cut into regions of ``region`` tokens. Region-level queries and keys are the means of the
region's q and k; their affinity routes each query region to its top-k key regions, and every query then
attends (exact softmax) to all tokens of its routed regions:

    A = mean_r(q) . mean_c(k)^T  ([T/region, T/region]),   I_r = top-k_c A_{r,c}
    out_i = sum_{j in regions I_{r(i)}} softmax_j(scale q_i . k_j) v_j

Choices:
- ``region`` is a token count (the paper fixes a region *count* S x S, which would make regions depend on T).
- Regions are counted over real (unpadded) tokens; a region with no real key is never routed to; the last
  region may be partial (its mean is over the tokens it has). Ties go to the later region.
- causal_self: a query region's mean would mix in future queries, and a partial key region's mean future
  keys, so each query token is routed on its own: q_i against the means of the *completed* key regions before
  its own region (top-k of them), plus its own region always, under the causal mask (j <= i). So a query
  attends to at most (topk + 1) * region keys.
- Routing has no gradient (indices); the paper's optional local-context enhancement (a depthwise conv on v)
  belongs to the layer and is left out.
Paths: reference (dense mask); ``routed``: noncausal one gather per query region, causal per-query region
lists grouped by region (ops/topk_sparse). Cost O(T * (topk+1) * region * D) + routing O((T/region)^2 * D)
noncausal, O(T * T/region * D) causal.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..inputs import AttentionInputs
from ..mechanism import Complexity, Paper, Shape, register_mechanism
from ..ops.topk_sparse import RankLayout, block_reduce, order_key, select_top
from ..options import check_int
from ..patterns import Pattern
from ._routed_blocks import RoutedBlocks


@dataclass(frozen=True)
class BilevelRoutingOptions:
    region: int = 64  # tokens per region (a size, not a region count, so nothing depends on T)
    topk: int = 4  # key regions each query region is routed to (causal: plus the query's own region)

    def __post_init__(self):
        check_int("bilevel_routing", "region", self.region)
        check_int("bilevel_routing", "topk", self.topk)


@register_mechanism("bilevel_routing")
class BilevelRouting(RoutedBlocks):
    family = "routed sparse"
    paper = Paper("BiFormer: Vision Transformer with Bi-Level Routing Attention", 2023, "2303.08810")
    complexity = Complexity(
        time="O(T·topk·region·D) + routing O((T/region)²·D) noncausal, O(T·(T/region)·D) causal",
        memory="O(T·topk·(D+region) + T·T/region)",
    )
    Options = BilevelRoutingOptions
    example_options = ({"region": 4, "topk": 3}, {"region": 16, "topk": 1})
    fidelity_knob = ("topk", (1, 2, 4, 8))

    def block_size(self) -> int:
        return self.options.region

    def topk(self) -> int:
        return self.options.topk

    def block_scores(self, q, k, real, x):
        q_mean, _ = block_reduce(q, real, self.options.region, mean=True)  # [B, H, nQ, D]
        k_mean, _ = block_reduce(k, real, self.options.region, mean=True)  # [B, H, nK, D]
        return q_mean @ k_mean.transpose(-1, -2)  # [B, H, nQ, nK]: region affinity

    def causal_selection(self, x: AttentionInputs, layout: RankLayout):
        r = self.options.region
        q, k, real = self.ranked_qk(x, layout)  # q in place (per token), k in rank order
        k_mean, _ = block_reduce(k, real, r, mean=True)  # [B, H, nK, D]
        affinity = q @ k_mean.transpose(-1, -2)  # [B, H, Tq, nK]
        rank = layout.q_rank[:, None, :, None]  # [B|1, 1, Tq, 1]
        own = rank.clamp_min(0) // r
        region = torch.arange(affinity.shape[-1], device=affinity.device)
        blocks, valid = select_top(order_key(affinity, region, region < own), self.options.topk)  # completed ones
        own = own.expand(*blocks.shape[:3], 1)
        return torch.cat([blocks, own], -1), torch.cat([valid, (rank >= 0).expand_as(own)], -1)

    def flops(self, shape: Shape, pattern: Pattern) -> float:
        r, topk = self.options.region, self.options.topk
        nk = -(-shape.tk // r)
        causal = pattern is Pattern.CAUSAL_SELF
        routing = 2.0 * (shape.tq if causal else nk) * nk * shape.dk
        keys = min((topk + causal) * r, shape.tk)
        return shape.batch * shape.heads * (routing + 2.0 * shape.tq * keys * (shape.dk + shape.dv))
