"""sigmoid: the reference is the paper's formula; the tiled path is exact across many tiles."""

from __future__ import annotations

import math

import pytest
import torch

import attnkit
from attnkit.ops import tiled_sigmoid
from attnkit.testing import assert_close, make_qkv


def formula(q, k, v, causal, bias=None):
    b, t, h, d = q.shape
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / math.sqrt(d)
    f64 = torch.float64
    n = torch.arange(1, t + 1, dtype=f64)[:, None] if causal else torch.tensor(float(k.shape[1]), dtype=f64)
    s = s + (bias if bias is not None else -torch.log(n))
    w = torch.sigmoid(s)
    if causal:
        w = w * torch.ones(t, t).tril()
    return torch.einsum("bhqk,bkhd->bqhd", w, v.double())


@pytest.mark.parametrize("pattern", ["causal_self", "noncausal_self"])
@pytest.mark.parametrize("bias", [None, -3.0])
def test_reference_is_the_paper_formula(pattern, bias):
    q, k, v = make_qkv(2, 13, 13, 3, 3, 8, dtype=torch.float64)
    ref = attnkit.attend(q, k, v, "sigmoid", pattern=pattern, path="reference", bias=bias)
    assert_close("reference", formula(q, k, v, pattern == "causal_self", bias), ref, 1e-12)


def test_partial_outputs_over_disjoint_keys_add():
    """No normaliser: attention over keys A plus attention over keys B equals attention over A and B."""
    q, k, v = make_qkv(2, 6, 20, 4, 2, 8)
    a = torch.rand(2, 20, generator=torch.Generator().manual_seed(0)) > 0.5
    whole = attnkit.attend(q, k, v, "sigmoid", pattern="noncausal_cross", bias=-2.0)
    part_a = attnkit.attend(q, k, v, "sigmoid", pattern="noncausal_cross", bias=-2.0, key_padding_mask=a)
    part_b = attnkit.attend(q, k, v, "sigmoid", pattern="noncausal_cross", bias=-2.0, key_padding_mask=~a)
    assert_close("sum of parts", whole, part_a + part_b, 1e-5)


@pytest.mark.parametrize("pattern", ["causal_self", "noncausal_self", "noncausal_cross"])
def test_tiled_path_over_many_tiles(monkeypatch, pattern):
    """Small tiles so that head groups, query blocks, key blocks and diagonal tiles all occur."""
    monkeypatch.setattr(tiled_sigmoid, "QUERY_TILE", 16)
    monkeypatch.setattr(tiled_sigmoid, "KEY_TILE", 24)
    monkeypatch.setattr(tiled_sigmoid, "TILE_ELEMENTS", 16 * 24 * 3)  # 3 heads per tile, N = 8 heads
    tk = 100 if pattern.endswith("self") else 77
    q, k, v = make_qkv(2, 100, tk, 4, 2, 8, requires_grad=True)
    kpm = torch.rand(2, tk, generator=torch.Generator().manual_seed(1)) > 0.2
    ref = attnkit.attend(q, k, v, "sigmoid", pattern=pattern, key_padding_mask=kpm, path="reference")
    out = attnkit.attend(q, k, v, "sigmoid", pattern=pattern, key_padding_mask=kpm, path="blocked")
    assert_close("out", ref, out, 1e-5)
    g = torch.randn_like(ref)
    for name, r, f in zip(
        "qkv", torch.autograd.grad(ref, (q, k, v), g), torch.autograd.grad(out, (q, k, v), g), strict=True
    ):
        assert_close(f"d{name}", r, f, 1e-5)


def test_tiled_path_with_cache_offset(monkeypatch):
    monkeypatch.setattr(tiled_sigmoid, "QUERY_TILE", 8)
    monkeypatch.setattr(tiled_sigmoid, "KEY_TILE", 8)
    q, k, v = make_qkv(1, 40, 40, 2, 2, 8)
    full = attnkit.attend(q, k, v, "sigmoid", pattern="causal_self")
    _, cache = attnkit.attend(q[:, :29], k[:, :29], v[:, :29], "sigmoid", pattern="causal_self", return_state=True)
    rest = attnkit.attend(q[:, 29:], k[:, 29:], v[:, 29:], "sigmoid", pattern="causal_self", state=cache)
    assert_close("after cache", full[:, 29:], rest, 1e-5)
