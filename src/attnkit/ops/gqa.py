"""Grouped-query attention helpers: query head h uses key/value head h // (Hq / Hkv)."""

from __future__ import annotations

import torch


def repeat_kv(t: torch.Tensor, groups: int) -> torch.Tensor:
    """``[B, T, Hkv, D] -> [B, T, Hkv * groups, D]``, each kv head repeated for its query heads."""
    if groups == 1:
        return t
    return t.repeat_interleave(groups, dim=2)


def group_queries(q: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """``[B, T, Hq, D] -> [B, T, Hkv, G, D]``: the G query heads that share one kv head (a view)."""
    b, t, hq, d = q.shape
    return q.view(b, t, kv_heads, hq // kv_heads, d)
