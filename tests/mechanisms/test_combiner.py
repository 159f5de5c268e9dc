"""combiner: the factorised softmax written out a query at a time, its special cases, causality, memory shape."""

from __future__ import annotations

import math

import pytest
import torch
from largest_tensor import tensor_shapes

import attnkit
from attnkit.errors import InvalidOption
from attnkit.ops.gqa import repeat_kv
from attnkit.testing import assert_close, make_qkv


def combiner_literal(q, k, v, block, causal, kpm=None):
    """One query and one block at a time, fp64: blocks are runs of `block` real tokens; a query sees its own
    block's keys directly (causal: those up to it) and each other block (causal: each earlier one) as one key
    k̄_r with weight n_r, value v̄_r, all under one softmax. Padded query positions output 0."""
    b, t, h, d = q.shape
    k, v = repeat_kv(k, h // k.shape[2]), repeat_kv(v, h // v.shape[2])
    kpm = torch.ones(b, t, dtype=torch.bool) if kpm is None else kpm
    out = torch.zeros(b, t, h, v.shape[-1], dtype=torch.float64)
    scale = 1 / math.sqrt(d)
    for bi in range(b):
        real = [j for j in range(t) if kpm[bi, j]]
        blocks = [real[i : i + block] for i in range(0, len(real), block)]
        for hi in range(h):
            for i in range(t):
                if not kpm[bi, i]:
                    continue
                own = real.index(i) // block
                logits, values = [], []
                for r, members in enumerate(blocks):
                    if r == own:
                        for j in members:
                            if not causal or j <= i:
                                logits.append(scale * q[bi, i, hi] @ k[bi, j, hi])
                                values.append(v[bi, j, hi])
                    elif not causal or r < own:
                        k_mean = torch.stack([k[bi, j, hi] for j in members]).mean(0)
                        v_mean = torch.stack([v[bi, j, hi] for j in members]).mean(0)
                        logits.append(scale * q[bi, i, hi] @ k_mean + math.log(len(members)))
                        values.append(v_mean)
                w = torch.stack(logits).softmax(0)
                out[bi, i, hi] = (w[:, None] * torch.stack(values)).sum(0)
    return out


@pytest.mark.parametrize("pattern", ["noncausal_self", "causal_self"])
@pytest.mark.parametrize("padded", [False, True])
def test_paths_equal_the_literal_formula(pattern, padded):
    q, k, v = make_qkv(2, 23, 23, 4, 2, 8, dtype=torch.float64)
    kpm = None
    if padded:
        kpm = torch.rand(2, 23, generator=torch.Generator().manual_seed(1)) > 0.3
    mech = attnkit.create("combiner", block=5)
    want = combiner_literal(q, k, v, 5, pattern == "causal_self", kpm)
    for path in ("reference", "blocked"):
        got = mech(q, k, v, pattern=pattern, key_padding_mask=kpm, path=path)
        assert_close(path, want, got, 1e-9)


@pytest.mark.parametrize("pattern", ["noncausal_self", "causal_self"])
def test_blocks_of_equal_tokens_give_exact_softmax(pattern):
    """Weighting a summary by log(count) makes it stand for its block: with equal keys and values inside each
    block the factorisation is exact."""
    block = 4
    q, k, v = make_qkv(1, 24, 24, 2, 2, 8, dtype=torch.float64)
    k = k[:, ::block].repeat_interleave(block, dim=1)
    v = v[:, ::block].repeat_interleave(block, dim=1)
    want = attnkit.attend(q, k, v, mechanism="softmax", pattern=pattern)
    got = attnkit.attend(q, k, v, mechanism="combiner", pattern=pattern, block=block)
    assert_close("equal blocks", want, got, 1e-9)


def test_one_block_is_softmax():
    q, k, v = make_qkv(2, 30, 30, 4, 2, 16)
    for pattern in ("noncausal_self", "causal_self"):
        want = attnkit.attend(q, k, v, mechanism="softmax", pattern=pattern)
        got = attnkit.attend(q, k, v, mechanism="combiner", pattern=pattern, block=30)
        assert_close(pattern, want, got, 2e-5)


@pytest.mark.parametrize("path", ["reference", "blocked"])
def test_future_tokens_never_reach_the_past(path):
    """Perturbing tokens from position p on (mid-block or at a block start) leaves every output before p alone."""
    q, k, v = make_qkv(1, 37, 37, 2, 2, 8)
    mech = attnkit.create("combiner", block=8)
    base = mech(q, k, v, pattern="causal_self", path=path)
    for p in (3, 8, 13, 24, 36):
        q2, k2, v2 = q.clone(), k.clone(), v.clone()
        for t in (q2, k2, v2):
            t[:, p:] += 3 * torch.randn_like(t[:, p:])
        moved = mech(q2, k2, v2, pattern="causal_self", path=path)
        assert torch.equal(base[:, :p], moved[:, :p]), f"a token at or after {p} changed an earlier output"
        assert not torch.equal(base[:, p:], moved[:, p:])


def test_blocked_path_never_builds_a_t_by_t_tensor():
    t = 512
    q, k, v = make_qkv(1, t, t, 2, 2, 8)
    mech = attnkit.create("combiner", block=16)
    shapes = tensor_shapes(lambda: mech(q, k, v, pattern="noncausal_self", path="blocked"))
    big = [s for s in shapes if sum(1 for n in s if n >= t) >= 2]
    assert not big, f"tensors with two sequence-long dims: {big[:3]}"
    assert max(math.prod(s) for s in shapes) < t * t * 2  # scores are [.., T/block, block, block + T/block]


@pytest.mark.parametrize("bad", [0, -3, 2**70, 2.5, "8", True])
def test_block_option_is_validated(bad):
    with pytest.raises(InvalidOption, match="block"):
        attnkit.create("combiner", block=bad)


@pytest.mark.parametrize("pattern", ["noncausal_self", "causal_self"])
def test_every_key_padded_gives_zeros_that_backward_runs_through(pattern):
    q, k, v = (torch.randn(1, 16, 2, 8, requires_grad=True) for _ in range(3))
    with torch.no_grad():
        k[0, 3] = float("nan")  # a padded slot's NaN must not reach the gradients
    mask = torch.zeros(1, 16, dtype=torch.bool)
    out = attnkit.create("combiner", block=4)(q, k, v, pattern=pattern, key_padding_mask=mask)
    assert (out == 0).all()
    out.sum().backward()
    for t in (q, k, v):
        assert t.grad is not None and (t.grad == 0).all()
