"""PyTorch's fused scaled-dot-product attention called on attnkit's ``[B, T, H, D]`` layout.

The transposes are views: SDPA's CPU flash kernel reads strided inputs and writes its output in
``[B, T, H, D]`` memory order, so no copy is made in either direction (measured: same time as
calling SDPA on ``[B, H, T, D]`` tensors).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..inputs import AttentionInputs
from ..patterns import MaskPredicate, Pattern
from .masking import visibility


def sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    is_causal: bool = False,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``q [B,Tq,Hq,D], k [B,Tk,Hkv,D], v [B,Tk,Hkv,Dv] -> [B,Tq,Hq,Dv]``.

    ``mask`` is bool, broadcastable to ``[B, Hq, Tq, Tk]``, True where a key may be seen.
    ``is_causal`` uses SDPA's top-left alignment, so only pass it when ``Tq == Tk``.
    """
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=mask,
        is_causal=is_causal,
        scale=scale,
        enable_gqa=q.shape[2] != k.shape[2],
    )  # [B, Hq, Tq, Dv]
    return out.transpose(1, 2).contiguous()  # no-op when the kernel wrote [B, Tq, Hq, Dv] memory order


def masked_sdpa(x: AttentionInputs, extra: MaskPredicate | None = None) -> torch.Tensor:
    """SDPA over the keys ``x``'s pattern, padding and an optional extra predicate allow.

    Without padding, extra predicate or cache offset no mask tensor is built at all (the fused
    kernel's fastest case). Otherwise a bool ``[B|1, H|1, Tq, Tk]`` mask is passed, and queries that see
    no key are set to zero explicitly (backends differ: some return NaN there).
    """
    causal = x.pattern is Pattern.CAUSAL_SELF
    if extra is None and x.key_padding_mask is None and (not causal or x.q_offset == 0):
        return sdpa(x.q, x.k, x.v, scale=x.scale, is_causal=causal)
    mask = visibility(x, extra)
    out = sdpa(x.q, x.k, x.v, scale=x.scale, mask=mask)
    if mask is None:
        return out
    seen = mask.any(-1).transpose(1, 2)[..., None]  # [B|1, Tq, H|1, 1]
    return torch.where(seen, out, torch.zeros((), dtype=out.dtype, device=out.device))
