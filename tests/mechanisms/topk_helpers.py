"""Test helpers shared by the top-k sparse mechanisms (sea, bilevel_routing, dynamic_mask)."""

from __future__ import annotations

import math

import torch
from largest_tensor import largest_tensor

from attnkit.testing import make_qkv


def largest_call_tensor(mech, q, k, v, pattern: str, path: str) -> int:
    """Elements of the largest tensor one attention call produces."""
    return largest_tensor(lambda: mech(q, k, v, pattern=pattern, path=path))[0]


def softmax_over(q, k, v, allowed, bias=None):
    """Plain loop-free check: softmax(q k^T / sqrt(d) + bias) v over ``allowed [B, H, Tq, Tk]`` (fp64)."""
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / math.sqrt(q.shape[-1])
    if bias is not None:
        s = s + bias
    p = s.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0)
    return torch.einsum("bhqk,bkhd->bqhd", p, v.double())


def future_changes_nothing(mech, path: str, t: int = 48, cut: int = 20) -> None:
    """Causal leak check: perturbing tokens after ``cut`` leaves outputs up to ``cut`` unchanged."""
    q, k, v = make_qkv(2, t, t, 2, 2, 8)
    out = mech(q, k, v, pattern="causal_self", path=path)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for x in (q2, k2, v2):
        x[:, cut + 1 :] = torch.randn_like(x[:, cut + 1 :]) * 10
    out2 = mech(q2, k2, v2, pattern="causal_self", path=path)
    assert torch.equal(out[:, : cut + 1], out2[:, : cut + 1]), f"{path}: a later token changed an earlier output"
    assert not torch.allclose(out[:, cut + 1 :], out2[:, cut + 1 :])
