"""softmax: the reference is the textbook formula; the KV cache continues a sequence exactly."""

from __future__ import annotations

import math

import torch

import attnkit
from attnkit.testing import assert_close, make_qkv


def textbook(q, k, v, causal):
    """softmax(q k^T / sqrt(d)) v per head, written with loops over heads (fp64)."""
    b, t, h, d = q.shape
    out = torch.zeros(b, t, h, v.shape[-1], dtype=torch.float64)
    g = h // k.shape[2]
    for head in range(h):
        s = q[:, :, head].double() @ k[:, :, head // g].double().transpose(1, 2) / math.sqrt(d)
        if causal:
            s = s.masked_fill(torch.ones(t, k.shape[1], dtype=torch.bool).triu(1), float("-inf"))
        out[:, :, head] = s.softmax(-1) @ v[:, :, head // g].double()
    return out


def test_reference_is_the_textbook_formula():
    q, k, v = make_qkv(2, 17, 17, 4, 2, 8, dtype=torch.float64)
    for pattern, causal in (("causal_self", True), ("noncausal_self", False)):
        ref = attnkit.attend(q, k, v, pattern=pattern, path="reference")
        assert_close(pattern, textbook(q, k, v, causal), ref, 1e-12)


def test_causal_cross_equals_noncausal_cross():
    q, k, v = make_qkv(2, 9, 14, 4, 2, 8)
    a = attnkit.attend(q, k, v, pattern="causal_cross")
    b = attnkit.attend(q, k, v, pattern="noncausal_cross")
    assert torch.equal(a, b)


def test_bf16_is_accumulated_in_fp32():
    q, k, v = make_qkv(1, 64, 64, 2, 2, 32, dtype=torch.bfloat16)
    exact = textbook(q, k, v, causal=True)
    for path in ("reference", "sdpa"):
        out = attnkit.attend(q, k, v, pattern="causal_self", path=path)
        assert_close(path, exact, out.double(), 1e-2)  # bf16 output rounding only


def test_prefill_then_decode_steps():
    q, k, v = make_qkv(1, 30, 30, 4, 1, 16)
    full = attnkit.attend(q, k, v, pattern="causal_self")
    out, cache = attnkit.attend(q[:, :20], k[:, :20], v[:, :20], pattern="causal_self", return_state=True)
    steps = [out]
    for i in range(20, 30):
        o, cache = attnkit.attend(
            q[:, i : i + 1], k[:, i : i + 1], v[:, i : i + 1], pattern="causal_self", state=cache, return_state=True
        )
        steps.append(o)
    assert_close("decode", full, torch.cat(steps, 1), 1e-5)
    assert cache.length == 30 and cache.offset == 30
