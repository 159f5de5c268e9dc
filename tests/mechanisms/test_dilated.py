"""dilated: the dilation rules against a per-query loop, heads covering every key, the tile rule, no [T, T]."""

from __future__ import annotations

import math

import pytest
import torch

import attnkit
from attnkit.errors import InvalidOption
from attnkit.ops import block_layout
from attnkit.ops.block_layout import layout_from_predicate, layout_from_rule
from attnkit.patterns import Pattern
from attnkit.testing import assert_close, make_qkv


def per_query_loop(q, k, v, *, r, window, hetero, local, causal):
    """softmax over the keys each (query, head) sees, written out one query and head at a time."""
    b, t, h, d = q.shape
    out = torch.zeros(b, t, h, v.shape[-1], dtype=torch.float64)
    for i in range(t):
        for head in range(h):
            keys = []
            for j in range(t):
                dist = i - j
                shard = j % r == head % r if hetero else dist % r == 0
                near = window is None or abs(dist) <= window * r
                ok = (shard and near) or abs(dist) < local
                if ok and (not causal or j <= i):
                    keys.append(j)
            if not keys:
                continue
            s = torch.einsum("bd,bnd->bn", q[:, i, head].double(), k[:, keys, head].double()) / math.sqrt(d)
            out[:, i, head] = torch.einsum("bn,bnd->bd", s.softmax(-1), v[:, keys, head].double())
    return out


CONFIGS = [
    dict(dilation=2),
    dict(dilation=3, window=2),
    dict(dilation=4, heterogeneous=True),
    dict(dilation=3, window=1, heterogeneous=True, local=2),
    dict(dilation=2, local=3),
]


@pytest.mark.parametrize("pattern", ["noncausal_self", "causal_self"])
@pytest.mark.parametrize("opts", CONFIGS, ids=str)
def test_paths_follow_the_rules(pattern, opts):
    q, k, v = make_qkv(2, 23, 23, 4, 4, 8, dtype=torch.float64)
    expected = per_query_loop(
        q,
        k,
        v,
        r=opts["dilation"],
        window=opts.get("window"),
        hetero=opts.get("heterogeneous", False),
        local=opts.get("local", 0),
        causal=pattern == "causal_self",
    )
    for path in ("reference", "blocked"):
        out = attnkit.attend(q, k, v, "dilated", pattern=pattern, block=4, path=path, **opts)
        assert_close(path, expected, out, 1e-10)


@pytest.mark.parametrize("pattern", ["noncausal_self", "causal_self"])
def test_dilation_one_is_softmax(pattern):
    q, k, v = make_qkv(2, 40, 40, 4, 2, 16)
    soft = attnkit.attend(q, k, v, pattern=pattern)
    for path in ("reference", "blocked"):
        out = attnkit.attend(q, k, v, "dilated", pattern=pattern, dilation=1, block=8, path=path)
        assert_close(path, soft, out, 2e-5)


def test_heterogeneous_heads_cover_every_key():
    mech = attnkit.create("dilated", dilation=4, heterogeneous=True)
    pred = mech.mask_predicate("noncausal_self")
    h = torch.arange(4).view(-1, 1, 1)
    seen = pred(0, h, torch.arange(50).view(1, -1, 1), torch.arange(50).view(1, 1, -1))  # [H, Tq, Tk]
    assert (seen.sum(0) == 1).all(), "each key is seen by exactly one of r consecutive heads"


def full_tiles(layout, h, n) -> set[int]:
    used = layout.kv_count[h, n]
    return set(layout.kv_index[h, n, :used][~layout.partial[h, n, :used]].tolist())


@pytest.mark.parametrize("pattern", [Pattern.NONCAUSAL_SELF, Pattern.CAUSAL_SELF])
@pytest.mark.parametrize("opts", CONFIGS, ids=str)
@pytest.mark.parametrize("q_offset", [0, 5])
def test_tile_rule_is_sound(pattern, opts, q_offset):
    # the rule may over-approximate "any" but never miss a visible tile, and "all" must really be all
    mech = attnkit.create("dilated", block=4, **opts)
    tiling = mech.tiling(37 - q_offset, 37, q_offset, "cpu")
    heads = 4 if opts.get("heterogeneous") else 1
    exact = layout_from_predicate(mech.mask_predicate(pattern), tiling, heads)
    ruled = layout_from_rule(mech.tile_rule(pattern, 37), tiling, heads)
    for h in range(heads):
        for n in range(tiling.nq):
            got = set(ruled.kv_index[h, n, : ruled.kv_count[h, n]].tolist())
            want = set(exact.kv_index[h, n, : exact.kv_count[h, n]].tolist())
            assert want <= got
            assert full_tiles(ruled, h, n) <= full_tiles(exact, h, n)


def test_causal_outputs_ignore_the_future_on_the_fast_path():
    q, k, v = make_qkv(1, 60, 60, 4, 4, 8)
    opts = dict(dilation=3, heterogeneous=True, local=2, block=4)
    full = attnkit.attend(q, k, v, "dilated", pattern="causal_self", path="blocked", **opts)
    k2, v2 = k.clone(), v.clone()
    k2[:, 30:] += 5 * torch.randn_like(k2[:, 30:])
    v2[:, 30:] += 5 * torch.randn_like(v2[:, 30:])
    moved = attnkit.attend(q, k2, v2, "dilated", pattern="causal_self", path="blocked", **opts)
    torch.testing.assert_close(full[:, :30], moved[:, :30])


def test_work_is_a_fraction_of_the_dense_pairs():
    # without a window, a head computes about T^2 / r pairs: the layout visits few tiles beyond them
    mech = attnkit.create("dilated", dilation=4, block=16)
    tiling = mech.tiling(1024, 1024, 0, "cpu")
    layout = layout_from_rule(mech.tile_rule(Pattern.NONCAUSAL_SELF, 1024), tiling, 1)
    visited = layout.visited_pairs(16)
    assert visited <= 1.1 * 1024 * 1024 / 4


def test_fast_path_never_builds_a_square_tensor(monkeypatch):
    t = 512
    made = []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        made.append((q.shape[-2], k.shape[-2]))
        return real_sdpa(q, k, v, **kw)

    monkeypatch.setattr(block_layout.F, "scaled_dot_product_attention", spy)
    monkeypatch.setattr(block_layout, "GATHER_BUDGET", 1 << 16)
    q, k, v = make_qkv(1, t, t, 2, 2, 8)
    attnkit.attend(q, k, v, "dilated", pattern="noncausal_self", dilation=4, block=16, path="blocked")
    assert made and all(rows == 16 and keys <= t // 4 + 16 for rows, keys in made)


@pytest.mark.parametrize(
    "bad",
    [
        {"dilation": 0},
        {"dilation": 2**70},
        {"dilation": 2.0},
        {"window": -1},
        {"local": -2},
        {"block": 0},
        {"heterogeneous": "yes"},
    ],
)
def test_bad_options_raise(bad):
    name = next(iter(bad))
    with pytest.raises(InvalidOption, match=name):
        attnkit.create("dilated", **bad)


@pytest.mark.parametrize("pattern", ["noncausal_cross", "causal_cross"])
def test_cross_patterns_raise(pattern):
    q, k, v = make_qkv(1, 4, 6, 2, 2, 8)
    with pytest.raises(attnkit.UnsupportedPattern):
        attnkit.attend(q, k, v, "dilated", pattern=pattern)
