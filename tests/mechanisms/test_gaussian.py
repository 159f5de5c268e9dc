"""gaussian: the reference against GAAM written per query row; the blocked path (closed-form row moments,
tiled quadratic-logit softmax) agrees over many tiles, with padding, caches and parameter gradients."""

from __future__ import annotations

import math

import pytest
import torch

import attnkit
from attnkit.ops import _gaussian
from attnkit.testing import assert_close, make_qkv


@torch.no_grad()
def formula(mech, q, k, v, causal, kpm=None):
    """Per row: mean and variance of the visible scores, G = exp(-x_norm^2 / (2 c^2)), p = softmax(s) G renormed."""
    b, tq, h, d = q.shape
    g, eps = h // k.shape[2], mech.options.eps
    out = torch.zeros(b, tq, h, v.shape[-1], dtype=torch.float64)
    for i in range(b):
        for head in range(h):
            delta, c = float(mech.offset[head]), float(mech.spread[head])
            for t in range(tq):
                seen = [j for j in range(k.shape[1]) if (not causal or j <= t) and (kpm is None or kpm[i, j])]
                if not seen:
                    continue
                s = [float(q[i, t, head].double() @ k[i, j, head // g].double()) / math.sqrt(d) for j in seen]
                mu = sum(s) / len(s)
                var = sum((x - mu) ** 2 for x in s) / len(s)
                # softmax(s) * G, renormalised; multiplied in logs, as G underflows where var ~ 0
                log_gauss = [-(((x - (mu + delta)) / math.sqrt(var + eps)) ** 2) / (2 * c * c) for x in s]
                log_w = [x + lg for x, lg in zip(s, log_gauss, strict=True)]
                w = torch.tensor([math.exp(lw - max(log_w)) for lw in log_w], dtype=torch.float64)
                w = w / w.sum()
                out[i, t, head] = (w[:, None] * v[i, seen, head // g].double()).sum(0)
    return out


def build(heads=4, head_dim=8, **options):
    torch.manual_seed(0)
    mech = attnkit.create("gaussian", heads=heads, head_dim=head_dim, **options)
    with torch.no_grad():  # head-specific parameters, as after training
        mech.offset.copy_(torch.tensor([0.0, 0.7, -1.2, 0.3])[:heads])
        mech.spread.copy_(torch.tensor([2.0, 0.8, 1.5, 0.5])[:heads])
    return mech


@pytest.mark.parametrize("path", ["reference", "blocked"])
@pytest.mark.parametrize("pattern", ["causal_self", "noncausal_cross"])
def test_matches_the_gaam_formula(pattern, path):
    mech = build()
    tk = 10 if pattern == "causal_self" else 13
    q, k, v = make_qkv(2, 10, tk, 4, 2, 8, dtype=torch.float64)
    kpm = torch.rand(2, tk, generator=torch.Generator().manual_seed(0)) > 0.3
    kpm[1, :] = False
    kpm[1, 2] = True  # row 1: one real key only (variance 0)
    out = mech(q, k, v, pattern=pattern, key_padding_mask=kpm, path=path)
    expect = formula(mech, q, k, v, pattern == "causal_self", kpm)
    assert_close(path, expect, out, 1e-9)


def test_wide_gaussian_is_softmax():
    mech = attnkit.create("gaussian", heads=4, head_dim=16, init_scale=1e4)  # G ~ 1 everywhere
    q, k, v = make_qkv(2, 50, 50, 4, 2, 16)
    soft = attnkit.attend(q, k, v, pattern="causal_self")
    for path in ("reference", "blocked"):
        assert_close(path, soft, mech(q, k, v, pattern="causal_self", path=path), 1e-5)


def test_causal_moments_against_brute_force(monkeypatch):
    monkeypatch.setattr(_gaussian, "MOMENT_BLOCK", 8)
    q = torch.randn(6, 29, 8, dtype=torch.float64)
    k = torch.randn(6, 33, 8, dtype=torch.float64)  # 4 cached keys, then one per query
    s = torch.einsum("nqd,nkd->nqk", q, k)
    s = s.masked_fill(torch.arange(33)[None, :] > torch.arange(29)[:, None] + 4, 0.0)  # [N, Tq, Tk]
    m1, m2 = _gaussian.causal_moments(q, k, 4)
    assert_close("sum", s.sum(-1), m1, 1e-12)
    assert_close("sum of squares", s.square().sum(-1), m2, 1e-12)


@pytest.mark.parametrize("pattern", ["causal_self", "noncausal_self", "causal_cross"])
def test_blocked_over_many_tiles(monkeypatch, pattern):
    """Small tiles so that head groups, row blocks, diagonal tiles and moment blocks all occur."""
    monkeypatch.setattr(_gaussian, "TILE_ELEMENTS", 3 * 16 * 24)
    monkeypatch.setattr(_gaussian, "MIN_ROWS", 4)
    monkeypatch.setattr(_gaussian, "MOMENT_BLOCK", 16)
    mech = build(head_dim=16)
    tk = 90 if pattern.endswith("self") else 71
    q, k, v = make_qkv(2, 90, tk, 4, 2, 16, requires_grad=True)
    kpm = torch.rand(2, tk, generator=torch.Generator().manual_seed(1)) > 0.2
    kpm[0, :5] = False  # the first queries of row 0 see no real key (causal)
    ref = mech(q, k, v, pattern=pattern, key_padding_mask=kpm, path="reference")
    out = mech(q, k, v, pattern=pattern, key_padding_mask=kpm, path="blocked")
    assert_close("out", ref, out, 1e-5)
    g = torch.randn_like(ref)
    inputs = [q, k, v, mech.offset, mech.spread]
    names = ("dq", "dk", "dv", "doffset", "dscale")
    ref_grads, grads = torch.autograd.grad(ref, inputs, g), torch.autograd.grad(out, inputs, g)
    for name, r, f in zip(names, ref_grads, grads, strict=True):
        assert r.abs().sum() > 0, name
        assert_close(name, r, f, 1e-4)


def test_blocked_continues_a_cache(monkeypatch):
    monkeypatch.setattr(_gaussian, "TILE_ELEMENTS", 256)
    monkeypatch.setattr(_gaussian, "MIN_ROWS", 4)
    monkeypatch.setattr(_gaussian, "MOMENT_BLOCK", 8)
    mech = build(head_dim=16)
    q, k, v = make_qkv(1, 60, 60, 4, 4, 16)
    full = mech(q, k, v, pattern="causal_self", path="reference")
    _, cache = mech(q[:, :37], k[:, :37], v[:, :37], pattern="causal_self", return_state=True)
    rest = mech(q[:, 37:], k[:, 37:], v[:, 37:], pattern="causal_self", state=cache, path="blocked")
    assert_close("after cache", full[:, 37:], rest, 1e-5)


@pytest.mark.parametrize("tq", [1, 5, 40])
def test_causal_moments_after_a_long_cache(tq):
    """Few queries after many cached keys take the direct route (scores), many take the D x D sums."""
    q = torch.randn(4, tq, 16, dtype=torch.float64)
    k = torch.randn(4, 100 + tq, 16, dtype=torch.float64)
    s = torch.einsum("nqd,nkd->nqk", q, k)
    s = s.masked_fill(torch.arange(100 + tq)[None, :] > torch.arange(tq)[:, None] + 100, 0.0)
    m1, m2 = _gaussian.causal_moments(q, k, 100)
    assert_close("sum", s.sum(-1), m1, 1e-12)
    assert_close("sum of squares", s.square().sum(-1), m2, 1e-12)


@pytest.mark.parametrize("pattern", ["causal_self", "noncausal_self"])
def test_row_variance_of_nearly_equal_scores_does_not_cancel(pattern):
    """Keys close to one another give scores with a tiny spread on a large mean. The fp32 blocked path and
    token-by-token decoding must both stay as close to the fp64 reference as fp32 rounding of the scores
    allows (the fp32 reference itself is ~2e-3 off here); a one-pass E[s^2] - E[s]^2 lost it: 20% error."""
    torch.manual_seed(0)
    b, t, h, d = 1, 64, 4, 16
    k = 3 * torch.randn(1, 1, h, d) + 0.003 * torch.randn(b, t, h, d)
    q, v = torch.randn(b, t, h, d), torch.randn(b, t, h, d)
    mech = build(heads=h, head_dim=d)
    with torch.no_grad():
        want = mech(q.double(), k.double(), v.double(), pattern=pattern, path="reference").float()
        assert_close("blocked", want, mech(q, k, v, pattern=pattern, path="blocked"), 5e-3)
        if pattern == "causal_self":
            state, steps = None, []
            for i in range(t):
                sl = slice(i, i + 1)
                o, state = mech(q[:, sl], k[:, sl], v[:, sl], pattern=pattern, state=state, return_state=True)
                steps.append(o)
            assert_close("token by token", want, torch.cat(steps, 1), 5e-3)
