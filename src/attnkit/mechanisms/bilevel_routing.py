"""Bi-level routing attention — BiFormer: Vision Transformer with Bi-Level Routing Attention (Zhu et al., 2023,
arXiv:2303.08810), on 1-D sequences and on 2-D grids (``spatial_shape=(h, w)``, the paper's setting).

The tokens are cut into regions: ``region`` consecutive tokens of a sequence, or ``side x side`` squares of a
grid. Region-level queries and keys are the means of the region's q and k; their affinity routes each query
region to its top-k key regions, and every query then attends (one exact softmax) to all tokens of its
routed regions:

    A = mean_r(q) . mean_c(k)^T  ([nR, nR]),   I_r = top-k_c A_{r,c}
    out_i = sum_{j in regions I_{r(i)}} softmax_j(scale q_i . k_j) v_j

On a grid, r(i) = (row_i // side) * ceil(w / side) + col_i // side: regions are squares of the grid counted
from its top-left corner, numbered row-major.

Choices:
- ``region`` is a token count and ``region_side`` a side length (the paper fixes a region *count* S x S,
  which would make regions depend on the map size). ``region_side`` defaults to round(sqrt(region)), so
  ``region=64`` gives 8 x 8 regions; a side longer than an axis of the grid covers that axis.
- Regions are counted over real (unpadded) tokens; a region with no real key is never routed to; the last
  region may be partial (its means are over the tokens it has). On a grid, padding does not move a region
  (regions come from coordinates, key padding masks keys where they stand) and the regions of the last row
  and column of regions are partial when ``side`` does not divide the grid; their means are over their real
  cells, nothing is read outside the grid. Ties go to the later region (in row-major region order on a grid).
- causal_self (1-D only): a query region's mean would mix in future queries, and a partial key region's mean
  future keys, so each query token is routed on its own: q_i against the means of the *completed* key regions
  before its own region (top-k of them), plus its own region always, under the causal mask (j <= i). So a
  query attends to at most (topk + 1) * region keys. The grid form is noncausal_self only (the paper's).
- Routing has no gradient (indices); the paper's optional local-context enhancement (a depthwise conv on v)
  belongs to the layer and is left out.
Paths: reference (dense mask; on a grid, region ids from coordinates); ``routed``: noncausal one gather per
query region, causal per-query region lists grouped by region (ops/topk_sparse); on a grid the tokens are
first laid out region-major (ops/grid_regions, each region side^2 slots, edge slots masked) and the output
laid back. Cost O(T * (topk+1) * region * D) + routing O((T/region)^2 * D) noncausal, O(T * T/region * D)
causal (on a grid, region = side^2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..inputs import AttentionInputs
from ..mechanism import Complexity, Paper, Shape, fast_path, register_mechanism
from ..ops.gqa import repeat_kv
from ..ops.grid_regions import from_regions, region_counts, region_of_token, to_regions
from ..ops.reference import compute_dtype, dense_softmax_attention
from ..ops.topk_sparse import RankLayout, block_reduce, order_key, select_top, shared_candidate_attention
from ..options import check_int
from ..patterns import Pattern
from ._routed_blocks import RoutedBlocks


@dataclass(frozen=True)
class BilevelRoutingOptions:
    region: int = 64  # tokens per region (a size, not a region count, so nothing depends on T)
    topk: int = 4  # key regions each query region is routed to (causal: plus the query's own region)
    region_side: int | None = None  # grid form: regions are side x side squares (default round(sqrt(region)))

    def __post_init__(self):
        check_int("bilevel_routing", "region", self.region)
        check_int("bilevel_routing", "topk", self.topk)
        if self.region_side is not None:
            check_int("bilevel_routing", "region_side", self.region_side)

    @property
    def side(self) -> int:
        """The side of the grid form's square regions: ``region_side``, or sqrt(region) rounded to nearest."""
        if self.region_side is not None:
            return self.region_side
        root = math.isqrt(self.region)
        return root + (self.region - root * root > root)  # (root + 1/2)^2 = root^2 + root + 1/4


@register_mechanism("bilevel_routing")
class BilevelRouting(RoutedBlocks):
    family = "routed sparse"
    heads_independent = True
    paper = Paper("BiFormer: Vision Transformer with Bi-Level Routing Attention", 2023, "2303.08810")
    complexity = Complexity(
        time="O(T·topk·region·D) + routing O((T/region)²·D) noncausal, O(T·(T/region)·D) causal",
        memory="O(T·topk·(D+region) + T·T/region)",
    )
    Options = BilevelRoutingOptions
    # grid form: BiFormer's square regions on a 2-D map, noncausal_self (spatial_shape=(h, w))
    grid_dims = (2,)
    grid_patterns = frozenset({Pattern.NONCAUSAL_SELF})
    # region 4 -> 2 x 2 squares, region 9 -> 3 x 3: partial edge regions on the suite's odd grids (7 x 9, 10 x 20)
    example_options = ({"region": 4, "topk": 2}, {"region": 9, "topk": 1})
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

    # ---- the grid form: square regions of a 2-D map -------------------------------------------------

    def region_shape(self, grid: tuple[int, int]) -> tuple[int, int]:
        """The grid form's region ``(rows, cols)``: side x side, a side longer than an axis cut to that axis
        (the same tokens: the region covers the axis either way, and no slot lies wholly outside the grid)."""
        side = self.options.side
        return min(side, grid[0]), min(side, grid[1])

    def grid_selection(self, x: AttentionInputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Routing on a grid, shared by both paths: (regions, valid) ``[B, H, nR, topk]`` per query region and
        ``real [B|1, S]``, which of the ``S = nR * region slots`` of the region-major layout hold a real token.

        Region means are over the real tokens of each region (its cells inside the grid, not padded), taken
        on detached fp32 q and k (k repeated to q's heads): routing takes no gradient."""
        grid, region = x.spatial_shape, self.region_shape(x.spatial_shape)
        cdt = compute_dtype(x.q.dtype)
        kpm = x.key_padding_mask
        real = torch.ones(1, x.tk, dtype=torch.bool, device=x.k.device) if kpm is None else kpm
        real = to_regions(real, grid, region)  # [B|1, S]; slots past the grid's edge are False
        q = to_regions(x.q.detach().to(cdt), grid, region).transpose(1, 2)  # [B, H, S, D]
        k = to_regions(repeat_kv(x.k.detach(), x.groups).to(cdt), grid, region).transpose(1, 2)
        slots = region[0] * region[1]
        q_mean, _ = block_reduce(q, real, slots, mean=True)  # [B, H, nR, D]
        k_mean, counts = block_reduce(k, real, slots, mean=True)  # [B, H, nR, D], [B|1, 1, nR]
        affinity = q_mean @ k_mean.transpose(-1, -2)  # [B, H, nR, nR]
        ids = torch.arange(affinity.shape[-1], device=affinity.device)
        regions, valid = select_top(order_key(affinity, ids, (counts > 0)[:, :, None, :]), self.options.topk)
        return regions, valid, real

    def grid_reference(self, x: AttentionInputs):
        """The paper's picture: each token's region from its coordinates, the regions each query region is
        routed to, a dense [T, T] mask from that, one softmax."""
        grid = x.spatial_shape
        region = self.region_shape(grid)
        regions, valid, _ = self.grid_selection(x)  # [B, H, nR, topk]
        n = math.prod(region_counts(grid, region))
        routed = torch.zeros(*regions.shape[:3], n + 1, dtype=torch.bool, device=regions.device)
        routed = routed.scatter_(-1, torch.where(valid, regions, n), True)[..., :n]  # [B, H, nR, nR]
        region_of = region_of_token(grid, region, x.q.device)  # [T]

        def in_routed_region(b, h, q_idx, kv_idx):
            return routed[b, h, region_of[q_idx], region_of[kv_idx]]

        return dense_softmax_attention(x, in_routed_region), None

    def grid_routed(self, x: AttentionInputs):
        """Region-major layout, one shared candidate list (the routed regions' slots) per query region."""
        grid = x.spatial_shape
        region = self.region_shape(grid)
        slots = region[0] * region[1]
        regions, valid, real = self.grid_selection(x)  # [B, H, nR, topk], [B|1, S]
        b, h, nr, m = regions.shape
        cand = (regions[..., None] * slots + torch.arange(slots, device=regions.device)).flatten(-2)  # [B, H, nR, C]
        real_cand = real.expand(b, -1).gather(1, cand.flatten(1)).view_as(cand)  # edge and padded slots: False
        allowed = valid[..., None].expand(b, h, nr, m, slots).flatten(-2) & real_cand
        q, k, v = (to_regions(t, grid, region) for t in (x.q, x.k, x.v))  # [B, S, H, D]
        out = shared_candidate_attention(q, k, v, cand, allowed[..., None, :], scale=x.scale, query_block=slots)
        return from_regions(out, grid, region), None

    # ---- paths -------------------------------------------------------------------------------------

    def reference(self, x: AttentionInputs):
        if _on_grid(x):
            return self.grid_reference(x)
        return super().reference(x)

    @fast_path("routed", priority=10)
    def routed(self, x: AttentionInputs):
        if _on_grid(x):
            return self.grid_routed(x)
        return RoutedBlocks.routed(self, x)

    def flops(self, shape: Shape, pattern: Pattern) -> float:
        topk = self.options.topk
        if shape.grid is not None and len(shape.grid) == 2:  # the grid form: square regions of the call's map
            region = self.region_shape(shape.grid)
            n = math.prod(region_counts(shape.grid, region))
            routing = 2.0 * n * n * shape.dk
            keys = min(min(topk, n) * region[0] * region[1], shape.tk)
            return shape.batch * shape.heads * (routing + 2.0 * shape.tq * keys * (shape.dk + shape.dv))
        r = self.options.region
        nk = -(-shape.tk // r)
        causal = pattern is Pattern.CAUSAL_SELF
        routing = 2.0 * (shape.tq if causal else nk) * nk * shape.dk
        keys = min((topk + causal) * r, shape.tk)
        return shape.batch * shape.heads * (routing + 2.0 * shape.tq * keys * (shape.dk + shape.dv))


def _on_grid(x: AttentionInputs) -> bool:
    """Whether the call runs the grid form (a 2-D spatial_shape; a 1-D one is the sequence itself)."""
    return x.spatial_shape is not None and len(x.spatial_shape) == 2
