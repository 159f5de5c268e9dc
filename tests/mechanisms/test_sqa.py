"""sqa: the reference is the paper's formula on head-averaged queries; FLOPs and layouts of the options."""

from __future__ import annotations

import math

import pytest
import torch

import attnkit
from attnkit import Pattern
from attnkit.errors import ShapeError
from attnkit.mechanism import Shape
from attnkit.testing import assert_close, make_qkv


def formula(q, k, v, hs, causal):
    """Loops over reduced heads: q_s = mean of its query group, softmax attention, output repeated."""
    b, tq, hq, d = q.shape
    hkv, r = k.shape[2], hq // hs
    out = torch.zeros(b, tq, hq, v.shape[-1], dtype=torch.float64)
    for s in range(hs):
        q_s = q[:, :, s * r : (s + 1) * r].double().mean(2)  # [B, Tq, D]
        kv = s * r // (hq // hkv)  # the kv head of the group's query heads
        scores = torch.einsum("bqd,bkd->bqk", q_s, k[:, :, kv].double()) / math.sqrt(d)
        if causal:
            scores = scores.masked_fill(torch.ones(tq, tq, dtype=torch.bool).triu(1), float("-inf"))
        head = scores.softmax(-1) @ v[:, :, kv].double()  # [B, Tq, Dv]
        for j in range(r):
            out[:, :, s * r + j] = head
    return out


@pytest.mark.parametrize("path", ["reference", "sdpa"])
@pytest.mark.parametrize("pattern", ["causal_self", "noncausal_cross"])
@pytest.mark.parametrize("hs", [1, 2, 4])
def test_matches_the_formula(pattern, hs, path):
    tk = 11 if pattern == "causal_self" else 17
    q, k, v = make_qkv(2, 11, tk, 8, 2 if hs > 1 else 1, 16, dtype=torch.float64)
    out = attnkit.attend(q, k, v, "sqa", pattern=pattern, query_heads=hs, path=path)
    assert_close(path, formula(q, k, v, hs, pattern == "causal_self"), out, 1e-12)


def test_all_query_heads_is_softmax():
    q, k, v = make_qkv(2, 30, 30, 4, 2, 16)
    sqa = attnkit.attend(q, k, v, "sqa", pattern="causal_self", query_heads=4)
    assert_close("query_heads = Hq", attnkit.attend(q, k, v, pattern="causal_self"), sqa, 1e-6)


def test_default_is_half_the_heads():
    q, k, v = make_qkv(1, 9, 9, 8, 2, 16)
    assert_close(
        "default",
        attnkit.attend(q, k, v, "sqa", pattern="noncausal_self", query_heads=4),
        attnkit.attend(q, k, v, "sqa", pattern="noncausal_self"),
        1e-7,
    )
    # an odd head count: the largest divisor below half (5 -> 1, 9 -> 3), never an error about an option
    # the user did not set
    mech = attnkit.create("sqa")
    assert [mech.query_heads(h) for h in (1, 3, 5, 6, 9)] == [1, 1, 1, 3, 3]
    q, k, v = make_qkv(1, 9, 9, 9, 3, 16)
    assert_close(
        "odd heads",
        attnkit.attend(q, k, v, "sqa", pattern="causal_self", query_heads=3),
        attnkit.attend(q, k, v, "sqa", pattern="causal_self"),
        1e-7,
    )


def test_flops_scale_with_query_heads():
    shape = Shape(1, 4096, 4096, 16, 4, 64, 64)
    full = attnkit.create("softmax").flops(shape, Pattern.CAUSAL_SELF)
    for hs in (4, 8, 16):
        assert attnkit.create("sqa", query_heads=hs).flops(shape, Pattern.CAUSAL_SELF) == full * hs / 16


def test_pool_kv_is_symmetric_sqa():
    """k with more heads than query_heads: groups of kv heads are averaged (sSQA), or it raises."""
    q, k, v = make_qkv(2, 12, 12, 8, 8, 16, dtype=torch.float64)
    pooled = attnkit.attend(q, k, v, "sqa", pattern="causal_self", query_heads=4)
    k2, v2 = (t.view(2, 12, 4, 2, 16).mean(3) for t in (k, v))  # 8 kv heads averaged in pairs
    assert_close("pooled kv", formula(q, k2, v2, 4, True), pooled, 1e-12)
    with pytest.raises(ShapeError, match="pool_kv"):
        attnkit.attend(q, k, v, "sqa", pattern="causal_self", query_heads=4, pool_kv=False)


def test_layouts_that_do_not_fit_raise():
    q, k, v = make_qkv(1, 5, 5, 8, 2, 16)
    with pytest.raises(ShapeError, match="query_heads=3 must divide"):
        attnkit.attend(q, k, v, "sqa", pattern="causal_self", query_heads=3)
    q, k, v = make_qkv(1, 5, 5, 12, 4, 16)
    with pytest.raises(ShapeError, match="k has 4 heads"):
        attnkit.attend(q, k, v, "sqa", pattern="causal_self", query_heads=6)


def test_pooled_cache_keeps_query_heads_kv_heads():
    """Under pool_kv the cache holds the Hs averaged kv heads: chunks reproduce the full call."""
    q, k, v = make_qkv(2, 20, 20, 8, 8, 16)
    mech = attnkit.create("sqa", query_heads=2)
    full = mech(q, k, v, pattern="causal_self")
    _, state = mech(q[:, :13], k[:, :13], v[:, :13], pattern="causal_self", return_state=True)
    assert state.k.shape == (2, 13, 2, 16)
    assert state.k.nbytes + state.v.nbytes == mech.state_bytes(Shape(2, 13, 13, 8, 8, 16, 16)) <= state.nbytes
    rest = mech(q[:, 13:], k[:, 13:], v[:, 13:], pattern="causal_self", state=state)
    assert_close("after cache", full[:, 13:], rest, 1e-5)
    empty = mech.init_state(2, 8, 16, 16)  # made without knowing q's heads: swapped on first use
    assert_close("from init_state", full, mech(q, k, v, pattern="causal_self", state=empty), 1e-6)
