"""Visibility of keys to queries: dense masks for references, counts and row checks for fast paths."""

from __future__ import annotations

import torch

from ..inputs import AttentionInputs
from ..patterns import MaskPredicate, Pattern, and_masks, dense_mask, pattern_predicate


def visibility(x: AttentionInputs, extra: MaskPredicate | None = None) -> torch.Tensor | None:
    """Bool mask ``[B|1, H|1, Tq, Tk]`` of the keys each query may see, or None when it sees all.

    Combines the pattern's positional rule, an optional extra predicate (a window, say; it may depend on
    the batch row and query head) and the key padding mask.
    """
    pred = and_masks(pattern_predicate(x.pattern), extra)
    m = dense_mask(pred, x.tq, x.tk, q_offset=x.q_offset, batch=x.batch, heads=x.heads, device=x.q.device)
    kpm = x.key_padding_mask
    if kpm is not None:
        kpm = kpm[:, None, None, :]  # [B, 1, 1, Tk]
        m = kpm if m is None else m & kpm
    return m


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Softmax over the last axis where ``mask`` holds; rows with no visible key become all zero."""
    if mask is None:
        return scores.softmax(-1)
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.softmax(-1)
    return torch.where(mask.any(-1, keepdim=True), probs, torch.zeros_like(probs))


def visible_counts(x: AttentionInputs) -> torch.Tensor:
    """How many keys each query sees under the pattern and padding: ``[B or 1, Tq]`` float.

    Closed form (no ``[Tq, Tk]`` mask): causal_self counts keys up to the query's position.
    """
    device = x.q.device
    kpm = x.key_padding_mask
    if x.pattern is Pattern.CAUSAL_SELF:
        pos = torch.arange(x.tq, device=device) + x.q_offset  # key position of each query
        if kpm is None:
            return (pos + 1).to(torch.float32)[None]
        real_so_far = kpm.cumsum(dim=1)  # [B, Tk]
        return real_so_far[:, pos].to(torch.float32)
    if kpm is None:
        return torch.full((1, x.tq), float(x.tk), device=device)
    return kpm.sum(dim=1, dtype=torch.float32)[:, None].expand(-1, x.tq)
