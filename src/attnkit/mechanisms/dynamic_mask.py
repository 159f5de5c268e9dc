"""Dynamic Mask Attention — Trainable Dynamic Mask Sparse Attention (Shi et al., 2025, arXiv:2508.02124).

Each key gets a content-aware score from its value; the score is both a bias on the attention scores and
what chooses the keys: every query keeps the ``keep`` visible keys of highest score and runs softmax over
them only:

    z_j = exp(A_h * softplus(v_j . w_h))                    (learned w_h [Dv], A_h per head)
    S_i = top-keep_j { z_j : j visible to i },   out_i = sum_{j in S_i} softmax_j(scale q_i . k_j + z_j) v_j

Choices where the paper leaves room:
- The paper's projection reads all heads' values (one linear map to per-head scores); here each query head
  has its own ``w_h`` over its own value vector, so GQA equals repeating k, v. ``w`` starts as a linear
  layer's weight (uniform +-1/sqrt(Dv)); ``A`` starts at 1 (the authors' code starts it at 0, where every key
  ties and only the position rule below chooses; 1 makes the choice content-aware from the first step).
- Position awareness: causal_self keeps only keys j <= i; ties of z go to the later (more recent) key, so the
  order is total and every path selects the same keys. noncausal_self: z depends on the key alone, so every
  query keeps the same ``keep`` keys.
- Selection takes no gradient (indices); z gets its gradient as the bias of the kept scores.
Paths: reference (dense [T, T] selection by per-query top-k); ``blocked``: noncausal one gather of the kept
keys; causal per block of ``block_size`` queries, the candidates are the top-keep keys before the block (an
associative top-k scan over blocks, O(T/block * keep * log)) plus the block's own keys, and each query keeps
the top-keep of its visible candidates: O(T * (keep + block) * D), no [T, T].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ShapeError
from ..inputs import AttentionInputs
from ..mechanism import Complexity, Mechanism, Paper, Shape, fast_path, register_mechanism
from ..ops.gqa import repeat_kv
from ..ops.masking import masked_softmax, visibility
from ..ops.reference import compute_dtype, upcast_qkv
from ..ops.topk_sparse import NEVER, order_key, select_top, shared_candidate_attention
from ..options import check_int
from ..patterns import Pattern
from ..state import KVCache


@dataclass(frozen=True)
class DynamicMaskOptions:
    keep: int = 64  # keys each query attends to (a count: the top-keep visible keys by content score)
    block_size: int = 64  # queries per block of the causal fast path (speed only: the output does not change)

    def __post_init__(self):
        check_int("dynamic_mask", "keep", self.keep)
        check_int("dynamic_mask", "block_size", self.block_size)


@register_mechanism("dynamic_mask")
class DynamicMask(Mechanism):
    family = "routed sparse"
    paper = Paper("Trainable Dynamic Mask Sparse Attention", 2025, "2508.02124")
    patterns = frozenset({Pattern.NONCAUSAL_SELF, Pattern.CAUSAL_SELF})
    exact = False
    trainable = True
    state_kind = KVCache
    complexity = Complexity(time="O(T·(keep+block)·D)", memory="O(T·(keep+block))")
    Options = DynamicMaskOptions
    example_options = ({"keep": 4, "block_size": 8}, {"keep": 16, "block_size": 4})
    fidelity_knob = ("keep", (16, 64, 256))

    def __init__(self, heads: int | None = None, head_dim: int | None = None, **options):
        super().__init__(heads, head_dim, **options)
        bound = 1.0 / math.sqrt(head_dim)
        self.score_weight = nn.Parameter((torch.rand(heads, head_dim) * 2 - 1) * bound)  # w_h: v -> score
        self.score_gain = nn.Parameter(torch.ones(heads))  # A_h

    def check_call(self, x: AttentionInputs) -> None:
        super().check_call(x)
        if x.v.shape[-1] != self.head_dim:
            raise ShapeError(
                f"dynamic_mask was created for head_dim={self.head_dim} (its content scores read v);"
                f" got v with head dim {x.v.shape[-1]}"
            )

    # ---- the selection (shared by every path) ------------------------------------------------------

    def content_scores(self, x: AttentionInputs) -> torch.Tensor:
        """z ``[B, H, Tk]`` (fp32; fp64 for fp64 inputs): exp(A_h softplus(v_j . w_h)), differentiable."""
        cdt = compute_dtype(x.q.dtype)
        v = repeat_kv(x.v, x.groups).to(cdt)  # [B, Tk, H, Dv]
        u = torch.einsum("bthd,hd->bht", v, self.score_weight.to(cdt))
        return torch.exp(self.score_gain.to(cdt)[:, None] * F.softplus(u))

    def order_keys(self, x: AttentionInputs, z: torch.Tensor) -> torch.Tensor:
        """int64 ``[B, H, Tk]``: keys ordered by z, ties to the later key; padded keys are never kept."""
        pos = torch.arange(x.tk, device=z.device)
        real = None if x.key_padding_mask is None else x.key_padding_mask[:, None, :]
        return order_key(z, pos, real)

    # ---- paths -------------------------------------------------------------------------------------

    def reference(self, x: AttentionInputs):
        q, k, v = upcast_qkv(x)
        z = self.content_scores(x)  # [B, H, Tk]
        keys = self.order_keys(x, z)[:, :, None, :].expand(-1, -1, x.tq, -1)  # [B, H, Tq, Tk]
        seen = visibility(x)  # [B|1, 1, Tq, Tk] pattern and padding
        if seen is not None:
            keys = torch.where(seen, keys, NEVER)
        idx, ok = select_top(keys, self.options.keep)  # per query: its top-keep visible keys
        kept = torch.zeros(keys.shape, dtype=torch.bool, device=keys.device).scatter(-1, idx, ok)  # [B, H, Tq, Tk]
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * x.scale + z[:, :, None, :]  # [B, H, Tq, Tk]
        probs = masked_softmax(scores, kept)
        return torch.einsum("bhqk,bkhd->bqhd", probs, v).to(x.q.dtype), None

    @fast_path("blocked", priority=10)
    def blocked(self, x: AttentionInputs):
        z = self.content_scores(x)
        keys = self.order_keys(x, z)  # [B, H, Tk]
        if x.pattern is Pattern.CAUSAL_SELF:
            cand, allowed = self._causal_candidates(x, keys)  # [B, H, nQ, C], [B, H, nQ, bq, C]
            block = self.options.block_size
        else:  # the same keys for every query
            idx, ok = select_top(keys, self.options.keep)  # [B, H, keep]
            cand, allowed, block = idx[:, :, None, :], ok[:, :, None, None, :], x.tq
        bias = z.gather(-1, cand.clamp(0, x.tk - 1).flatten(2)).view(cand.shape)  # z of each candidate
        out = shared_candidate_attention(x.q, x.k, x.v, cand, allowed, scale=x.scale, query_block=block, bias=bias)
        return out, None

    def _causal_candidates(self, x: AttentionInputs, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per block of queries: the top-keep keys before the block plus the block's own keys (sorted by key),
        and for each query which of them it keeps (visible and among its top-keep)."""
        keep, bq, o = self.options.keep, self.options.block_size, x.q_offset
        b, h, tk = keys.shape
        nq = -(-x.tq // bq)
        own_idx = (o + torch.arange(nq * bq, device=keys.device)).view(nq, bq)  # key position of each query slot
        own_keys = F.pad(keys[..., o:], (0, nq * bq - (tk - o)), value=NEVER).view(b, h, nq, bq)
        own_idx = own_idx.expand(b, h, nq, bq)
        # segments: the cached keys [0, o), then each query block's own keys; their top-keep, then a prefix scan
        head = self._top_padded(keys[..., None, :o], torch.arange(o, device=keys.device), keep)
        blocks = self._top_padded(own_keys, own_idx, keep)
        seg_keys, seg_idx = (torch.cat([head[i], blocks[i]], 2) for i in (0, 1))  # [B, H, nq + 1, keep]
        seg_keys, seg_idx = self._prefix_top(seg_keys, seg_idx, keep)
        cand_keys = torch.cat([seg_keys[:, :, :nq], own_keys], -1)  # [B, H, nq, keep + bq]
        cand_idx = torch.cat([seg_idx[:, :, :nq], own_idx], -1)
        cand_keys, order = torch.sort(cand_keys, dim=-1, descending=True)
        cand_idx = torch.where(cand_keys == NEVER, -1, cand_idx.gather(-1, order))
        pos = own_idx[..., None]  # [B, H, nq, bq, 1]: each query's key position
        seen = (cand_idx[:, :, :, None, :] >= 0) & (cand_idx[:, :, :, None, :] <= pos)  # [B, H, nq, bq, C]
        return cand_idx, seen & (seen.cumsum(-1) <= keep)

    @staticmethod
    def _top_padded(keys: torch.Tensor, idx: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-keep of each row ``[..., n]`` as (keys, key positions) ``[..., keep]``, NEVER-padded."""
        shape = (*keys.shape[:-1], keep)
        if keys.shape[-1] == 0:
            return keys.new_full(shape, NEVER), idx.new_full(shape, -1).expand(shape)
        top, at = torch.topk(keys, min(keep, keys.shape[-1]), dim=-1)
        pos = idx.expand(keys.shape).gather(-1, at)
        pad = keep - top.shape[-1]
        return F.pad(top, (0, pad), value=NEVER), F.pad(pos, (0, pad), value=-1)

    @staticmethod
    def _prefix_top(keys: torch.Tensor, idx: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inclusive scan over axis 2 with "top-keep of the union" (associative): log2(n) merges."""
        shift = 1
        while shift < keys.shape[2]:
            both_keys = torch.cat([keys[:, :, shift:], keys[:, :, :-shift]], -1)
            both_idx = torch.cat([idx[:, :, shift:], idx[:, :, :-shift]], -1)
            top, at = torch.topk(both_keys, keep, dim=-1)
            keys = torch.cat([keys[:, :, :shift], top], 2)
            idx = torch.cat([idx[:, :, :shift], both_idx.gather(-1, at)], 2)
            shift *= 2
        return keys, idx

    def flops(self, shape: Shape, pattern: Pattern) -> float:
        keep = min(self.options.keep, shape.tk)
        content = 2.0 * shape.tk * shape.dv  # v . w per key and head
        return shape.batch * shape.heads * (content + 2.0 * shape.tq * keep * (shape.dk + shape.dv))
