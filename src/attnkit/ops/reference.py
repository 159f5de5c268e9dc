"""Pieces of the plain-PyTorch references: inputs upcast for exact arithmetic, and dense softmax attention."""

from __future__ import annotations

import torch

from ..inputs import AttentionInputs
from ..patterns import MaskPredicate
from .gqa import repeat_kv
from .masking import masked_softmax, visibility


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype references and accumulating paths compute in: fp64 stays fp64, everything else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def zeros_in_graph(x: AttentionInputs) -> torch.Tensor:
    """The ``[B, Tq, Hq, Dv]`` zero output of a call whose queries see no key, joined to q, k and v with a zero
    gradient, so that a backward pass runs through it. Joined by selection, never by multiplying by 0: a padded
    slot's NaN would give NaN."""
    never = torch.zeros((), dtype=torch.bool, device=x.q.device)
    joined = sum(torch.where(never, t.sum(), 0.0) for t in (x.q, x.k, x.v))
    return x.q.new_zeros(x.batch, x.tq, x.heads, x.v.shape[-1]) + joined


def upcast_qkv(x: AttentionInputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v in fp32 (fp64 stays fp64), with k and v repeated to the query heads (GQA)."""
    compute = compute_dtype(x.q.dtype)
    q = x.q.to(compute)  # [B, Tq, H, Dk]
    k = repeat_kv(x.k, x.groups).to(compute)  # [B, Tk, H, Dk]
    v = repeat_kv(x.v, x.groups).to(compute)  # [B, Tk, H, Dv]
    return q, k, v


def dense_softmax_attention(x: AttentionInputs, extra: MaskPredicate | None = None) -> torch.Tensor:
    """softmax(scale q k^T) v over the keys the pattern, the padding and ``extra`` allow, written out."""
    q, k, v = upcast_qkv(x)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * x.scale  # [B, H, Tq, Tk]
    probs = masked_softmax(scores, visibility(x, extra))  # [B, H, Tq, Tk]; rows seeing nothing are 0
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v)  # [B, Tq, H, Dv]
    return out.to(x.q.dtype)
