"""block_sparse: the block rule against a per-query loop, full layouts equal softmax, random blocks (seed,
redraw, no future), cross patterns, the tile rule, bounded work."""

from __future__ import annotations

import math

import pytest
import torch

import attnkit
from attnkit.errors import InvalidOption
from attnkit.mechanisms.block_sparse import random_block
from attnkit.ops.block_layout import layout_from_predicate, layout_from_rule
from attnkit.patterns import Pattern
from attnkit.testing import assert_close, make_qkv


def per_query_loop(mech, q, k, v, pattern):
    """softmax over the keys the block rule allows, one query and head at a time (random picks from the
    mechanism's own hash, everything else written out here)."""
    o, causal = mech.options, pattern == "causal_self"
    b, tq, h, d = q.shape
    tk = k.shape[1]
    nk = -(-tk // o.block)
    salt = mech.salt()
    out = torch.zeros(b, tq, h, v.shape[-1], dtype=torch.float64)
    for i in range(tq):
        a = i // o.block
        for head in range(h):
            picks = set()
            for t in range(o.random_blocks):
                x = int(random_block(salt, torch.tensor(head), torch.tensor(a), t))
                if causal and a > 0:
                    picks.add(x % a)
                elif not causal:
                    picks.add(x % nk)
            keys = [
                j
                for j in range(tk)
                if (abs(a - j // o.block) <= o.window_blocks or j // o.block < o.global_blocks
                    or a < o.global_blocks or j // o.block in picks)
                and (not causal or j <= i)
            ]  # fmt: skip
            s = torch.einsum("bd,bnd->bn", q[:, i, head].double(), k[:, keys, head].double()) / math.sqrt(d)
            out[:, i, head] = torch.einsum("bn,bnd->bd", s.softmax(-1), v[:, keys, head].double())
    return out


OPTS = [
    dict(block=4, global_blocks=1, window_blocks=1, random_blocks=2, seed=1),
    dict(block=3, global_blocks=0, window_blocks=0, random_blocks=3, seed=2),
    dict(block=5, global_blocks=2, window_blocks=2, random_blocks=0),
]


@pytest.mark.parametrize("pattern", ["noncausal_self", "causal_self", "noncausal_cross", "causal_cross"])
@pytest.mark.parametrize("opts", OPTS, ids=str)
def test_paths_follow_the_block_rule(pattern, opts):
    tk = 29 if pattern.endswith("self") else 17
    q, k, v = make_qkv(2, 29, tk, 3, 3, 8, dtype=torch.float64)
    mech = attnkit.create("block_sparse", **opts)
    expected = per_query_loop(mech, q, k, v, pattern)
    for path in ("reference", "blocked"):
        assert_close(path, expected, mech(q, k, v, pattern=pattern, path=path), 1e-10)


@pytest.mark.parametrize("pattern", ["noncausal_self", "causal_self", "noncausal_cross"])
def test_a_full_layout_is_softmax(pattern):
    q, k, v = make_qkv(2, 40, 40 if pattern.endswith("self") else 33, 4, 2, 16)
    soft = attnkit.attend(q, k, v, pattern=pattern)
    for path in ("reference", "blocked"):
        out = attnkit.attend(q, k, v, "block_sparse", pattern=pattern, block=8, window_blocks=5, path=path)
        assert_close(path, soft, out, 2e-5)


def test_seed_reproduces_and_redraw_changes_the_random_blocks():
    q, k, v = make_qkv(1, 96, 96, 4, 4, 8)
    opts = dict(block=4, global_blocks=0, window_blocks=0, random_blocks=2)
    a = attnkit.create("block_sparse", seed=7, **opts)
    b = attnkit.create("block_sparse", seed=7, **opts)
    out_a = a(q, k, v, pattern="causal_self")
    torch.testing.assert_close(out_a, b(q, k, v, pattern="causal_self"))
    b.redraw(8)
    assert not torch.allclose(out_a, b(q, k, v, pattern="causal_self"))
    b.redraw(7)
    torch.testing.assert_close(out_a, b(q, k, v, pattern="causal_self"))
    assert a.state_dict()["_extra_state"]["draw_seed"] == 7


def test_causal_random_blocks_are_past_blocks_independent_of_length():
    mech = attnkit.create("block_sparse", block=4, global_blocks=0, window_blocks=0, random_blocks=3, seed=1)
    pred_short, pred_long = (mech.mask_predicate("causal_self", t) for t in (40, 4000))
    h = torch.arange(3).view(-1, 1, 1)
    qi, kj = torch.arange(40).view(1, -1, 1), torch.arange(40).view(1, 1, -1)
    short, long = pred_short(0, h, qi, kj), pred_long(0, h, qi, kj)
    assert torch.equal(short, long)
    assert not (short & (kj > qi)).any()
    picks = short & (kj // 4 < qi // 4)  # the random (past) blocks
    assert picks.any()


def test_causal_outputs_ignore_the_future_on_the_fast_path():
    q, k, v = make_qkv(1, 64, 64, 4, 4, 8)
    opts = dict(block=4, global_blocks=1, window_blocks=1, random_blocks=2, seed=3)
    full = attnkit.attend(q, k, v, "block_sparse", pattern="causal_self", path="blocked", **opts)
    k2, v2 = k.clone(), v.clone()
    k2[:, 33:] += 5 * torch.randn_like(k2[:, 33:])
    v2[:, 33:] += 5 * torch.randn_like(v2[:, 33:])
    moved = attnkit.attend(q, k2, v2, "block_sparse", pattern="causal_self", path="blocked", **opts)
    torch.testing.assert_close(full[:, :33], moved[:, :33])


def test_causal_cross_queries_do_not_influence_each_other():
    q, k, v = make_qkv(1, 30, 21, 2, 2, 8)
    opts = dict(block=4, global_blocks=1, window_blocks=1, random_blocks=2, seed=3)
    full = attnkit.attend(q, k, v, "block_sparse", pattern="causal_cross", path="blocked", **opts)
    q2 = q.clone()
    q2[:, 10:] += torch.randn_like(q2[:, 10:])
    moved = attnkit.attend(q2, k, v, "block_sparse", pattern="causal_cross", path="blocked", **opts)
    torch.testing.assert_close(full[:, :10], moved[:, :10])


@pytest.mark.parametrize(("pattern", "q_offset"), [(p, 0) for p in Pattern] + [(Pattern.CAUSAL_SELF, 6)])
def test_tile_rule_equals_the_predicate(pattern, q_offset):  # an offset only comes with a KV cache
    mech = attnkit.create("block_sparse", block=4, global_blocks=1, window_blocks=1, random_blocks=2, seed=2)
    tk = 37
    tq = tk - q_offset if pattern.is_self else 23
    tiling = mech.tiling(tq, tk, q_offset, "cpu")
    exact = layout_from_predicate(mech.mask_predicate(pattern, tk), tiling, 3)
    ruled = layout_from_rule(mech.tile_rule(pattern, tk), tiling, 3)
    assert torch.equal(exact.kv_count, ruled.kv_count)
    assert torch.equal(exact.kv_index.sort(-1).values, ruled.kv_index.sort(-1).values)


def test_work_is_bounded_by_the_blocks_each_query_sees():
    # memory O(T (w + g + r)): tiles of non-global rows visit at most 2w+1+g+r key tiles
    o = dict(block=16, global_blocks=1, window_blocks=1, random_blocks=2, seed=0)
    mech = attnkit.create("block_sparse", **o)
    t = 4096
    tiling = mech.tiling(t, t, 0, "cpu")
    layout = layout_from_rule(mech.tile_rule(Pattern.NONCAUSAL_SELF, t), tiling, 2)
    per_tile = layout.kv_count[:, 1:]  # tile 0 holds global queries: it sees everything
    assert int(per_tile.max()) <= 2 * 1 + 1 + 1 + 2
    assert int(layout.kv_count[:, 0].max()) == t // 16


@pytest.mark.parametrize(
    "bad",
    [
        {"block": 0},
        {"block": 2**70},
        {"global_blocks": -1},
        {"window_blocks": 1.5},
        {"random_blocks": -2},
        {"seed": -1},
    ],
)
def test_bad_options_raise(bad):
    name = next(iter(bad))
    with pytest.raises(InvalidOption, match=name):
        attnkit.create("block_sparse", **bad)
