"""reformer and its ops (ops/lsh, ops/bucketed): bucket-membership attention written out a query at a time, the
union over rounds, causal leaks, seeds and redraws, option checks, and no [T, T] tile in the fast path."""

from __future__ import annotations

import math

import pytest
import torch
from group_literal import group_attention_literal

import attnkit
from attnkit.errors import InvalidOption
from attnkit.ops import bucketed
from attnkit.ops.bucketed import bucketed_attention
from attnkit.ops.lsh import angular_buckets, random_rotations
from attnkit.testing import assert_close, make_qkv

SELF = ("noncausal_self", "causal_self")


def test_angular_buckets_are_the_argmax_over_plus_minus_rotations():
    rot = random_rotations(torch.Generator().manual_seed(0), 16, 3, 10)  # [3, 16, 5]
    x = torch.randn(50, 2, 16, dtype=torch.float64)
    rotated = torch.einsum("ntd,rdk->ntrk", x, rot)
    want = torch.cat([rotated, -rotated], dim=-1).argmax(-1)
    got = angular_buckets(x, rot)
    assert got.shape == (50, 2, 3) and torch.equal(got, want)
    assert torch.equal(angular_buckets(3.7 * x, rot), got), "only the direction matters"
    with pytest.raises(ValueError, match="even"):
        random_rotations(torch.Generator(), 16, 1, 7)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("n_groups", "rounds", "block"), [(3, 3, 4), (1, 1, 4), (5, 2, 16), (40, 2, 2)])
def test_bucketed_op_equals_the_literal_loop(causal, n_groups, rounds, block):
    """Synthetic group ids (unequal group sizes, one group = everything, groups of 1), GQA, a cache offset,
    key padding: the op computes exactly the union-of-groups softmax."""
    g = torch.Generator().manual_seed(1)
    tq, offset = 13, (6 if causal else 0)
    tk = tq + offset
    q, k, v = make_qkv(2, tq, tk, 4, 2, 8, dtype=torch.float64)
    q_ids = torch.randint(n_groups, (2, 4, rounds, tq), generator=g)
    k_ids = torch.randint(n_groups, (2, 2, rounds, tk), generator=g).repeat_interleave(2, dim=1)
    kpm = torch.rand(2, tk, generator=g) > 0.25
    want = group_attention_literal(q, k, v, q_ids, k_ids, causal=causal, q_offset=offset, kpm=kpm)
    got = bucketed_attention(
        q, k, v, q_ids, k_ids, n_groups=n_groups, scale=1 / math.sqrt(8), causal=causal, q_offset=offset,
        key_padding_mask=kpm, block=block,
    )  # fmt: skip
    assert_close("op", want, got, 1e-12)


def test_a_pair_shared_in_several_rounds_counts_once():
    # query 0 shares a group with key 0 in all three rounds and with key 1 in one: equal scores give 1/2 each
    q = torch.ones(1, 1, 1, 4, dtype=torch.float64)
    k = torch.ones(1, 2, 1, 4, dtype=torch.float64)
    v = torch.tensor([[0.0], [1.0]], dtype=torch.float64).view(1, 2, 1, 1)
    q_ids = torch.tensor([0, 0, 0]).view(1, 1, 3, 1)
    k_ids = torch.tensor([[0, 1], [0, 2], [0, 0]]).view(1, 1, 3, 2)
    out = bucketed_attention(q, k, v, q_ids, k_ids, n_groups=3, scale=1.0, causal=False)
    assert out.item() == pytest.approx(0.5)


@pytest.mark.parametrize("pattern", SELF)
def test_reformer_equals_bucket_membership_written_out(pattern):
    mech = attnkit.create("reformer", n_buckets=4, n_hashes=3, seed=5, block_size=4)
    q, k, v = make_qkv(2, 21, 21, 4, 2, 8, dtype=torch.float64)
    rot = mech.rotations(8, torch.device("cpu"), torch.float64)  # [R, D, n/2]
    q_ids = angular_buckets(q, rot).permute(0, 2, 3, 1)  # [B, Hq, R, T]
    k_ids = angular_buckets(k, rot).repeat_interleave(2, dim=2).permute(0, 2, 3, 1)
    want = group_attention_literal(q, k, v, q_ids, k_ids, causal=pattern == "causal_self")
    for path in ("reference", "bucketed"):
        assert_close(path, want, mech(q, k, v, pattern=pattern, path=path), 1e-12)


def test_same_directions_share_every_bucket_so_it_is_softmax():
    """Keys and queries along one direction (positive multiples) hash alike in every round: exact softmax."""
    direction = torch.randn(8)
    scales = torch.rand(2, 30, 2, 1) + 0.1
    q = direction * scales
    k = direction * scales.flip(1)
    v = torch.randn(2, 30, 2, 8)
    mech = attnkit.create("reformer", n_buckets=8, n_hashes=2, seed=0)
    for pattern in SELF:
        want = attnkit.attend(q, k, v, "softmax", pattern=pattern)
        assert_close(pattern, want, mech(q, k, v, pattern=pattern, path="bucketed"), 2e-5)


@pytest.mark.parametrize("path", ["reference", "bucketed"])
def test_future_tokens_never_change_past_outputs(path):
    mech = attnkit.create("reformer", n_buckets=6, n_hashes=2, seed=2, block_size=4)
    q, k, v = make_qkv(1, 60, 60, 2, 2, 16)
    out = mech(q, k, v, pattern="causal_self", path=path)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for t in (q2, k2, v2):
        t[:, 30:] = torch.randn_like(t[:, 30:]) * 3  # new buckets, new block layouts
    moved = mech(q2, k2, v2, pattern="causal_self", path=path)
    assert_close("past", out[:, :30], moved[:, :30], 2e-6)
    assert (out[:, 30:] - moved[:, 30:]).abs().max() > 1e-2


def test_seed_reproduces_and_redraw_changes_the_rotations():
    a = attnkit.create("reformer", seed=11)
    b = attnkit.create("reformer", seed=11)
    cpu = torch.device("cpu")
    r = a.rotations(16, cpu, torch.float32)
    assert r.shape == (4, 16, 32)
    assert torch.equal(r, b.rotations(16, cpu, torch.float32))
    a.redraw(12)
    assert not torch.equal(r, a.rotations(16, cpu, torch.float32))
    a.redraw(11)
    assert torch.equal(r, a.rotations(16, cpu, torch.float32))
    q, k, v = make_qkv(1, 40, 40, 2, 2, 16)
    assert torch.equal(a(q, k, v, pattern="noncausal_self"), b(q, k, v, pattern="noncausal_self"))


@pytest.mark.parametrize(
    "bad",
    [
        {"n_buckets": 7},
        {"n_buckets": 0},
        {"n_buckets": -4},
        {"n_buckets": 2**70},
        {"n_buckets": 8.0},
        {"n_hashes": 0},
        {"n_hashes": "4"},
        {"seed": -1},
        {"block_size": 0},
    ],
)
def test_bad_options_raise(bad):
    (name,) = bad
    with pytest.raises(InvalidOption, match=name):
        attnkit.create("reformer", **bad)


def test_fast_path_never_builds_a_t_by_t_tile(monkeypatch):
    seen = []
    real = torch.baddbmm

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.append(out.shape)
        return out

    monkeypatch.setattr(bucketed.torch, "baddbmm", spy)
    t = 512
    q, k, v = make_qkv(1, t, t, 2, 2, 16)
    attnkit.create("reformer", n_buckets=32, n_hashes=2, seed=0)(q, k, v, pattern="noncausal_self", path="bucketed")
    assert seen
    assert max(s[1] for s in seen) < t / 4 and max(s[2] for s in seen) < t / 4  # tiles are group-sized
    assert max(math.prod(s) for s in seen) <= bucketed.CHUNK_SCORES
