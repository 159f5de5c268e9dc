"""The kernel-attention formula written one query-key pair at a time, for the papers' literal tests."""

from __future__ import annotations

from collections.abc import Callable

import torch


def pairwise_kernel_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: str,
    similarity: Callable[[torch.Tensor, torch.Tensor, int, int, int], torch.Tensor],
    eps: float = 0.0,
) -> torch.Tensor:
    """``out_i = sum_j s_ij v_j / (sum_j s_ij + eps)`` in fp64 over the keys query i sees (j <= i for
    causal_self, every key otherwise), with ``s_ij = similarity(q_i, k_j, i, j, h)`` for query head h
    (``q [B, Tq, Hq, D]``, ``k``/``v`` ``[B, Tk, Hkv, D]``; query head h reads kv head h // (Hq / Hkv))."""
    b, tq, hq, _ = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    out = torch.zeros(b, tq, hq, v.shape[-1], dtype=torch.float64)
    for bi in range(b):
        for h in range(hq):
            kv = h // (hq // hkv)
            for i in range(tq):
                num, den = torch.zeros(v.shape[-1], dtype=torch.float64), 0.0
                last = i if pattern == "causal_self" else tk - 1
                for j in range(last + 1):
                    s = similarity(q[bi, i, h], k[bi, j, kv], i, j, h)
                    num, den = num + s * v[bi, j, kv], den + s
                out[bi, i, h] = num / (den + eps)
    return out
