"""Attention restricted to shared groups (LSH buckets, clusters), written out a query at a time (tests only)."""

from __future__ import annotations

import math

import torch


def group_attention_literal(q, k, v, q_ids, k_ids, *, causal, q_offset=0, kpm=None):
    """A query at a time in fp64: softmax over the keys sharing a group id in some round (once each)."""
    b, tq, hq, _ = q.shape
    tk, hkv, dv = k.shape[1], k.shape[2], v.shape[3]
    scale = 1 / math.sqrt(q.shape[-1])
    out = torch.zeros(b, tq, hq, dv, dtype=torch.float64)
    for bi in range(b):
        for h in range(hq):
            kh = h // (hq // hkv)
            for i in range(tq):
                keys = [
                    j
                    for j in range(tk)
                    if bool((q_ids[bi, h, :, i] == k_ids[bi, h, :, j]).any())
                    and (not causal or j <= i + q_offset)
                    and (kpm is None or bool(kpm[bi, j]))
                ]
                if not keys:
                    continue
                s = torch.stack([q[bi, i, h].double() @ k[bi, j, kh].double() * scale for j in keys])
                w = torch.softmax(s, 0)
                out[bi, i, h] = sum(w[n] * v[bi, j, kh].double() for n, j in enumerate(keys))
    return out
