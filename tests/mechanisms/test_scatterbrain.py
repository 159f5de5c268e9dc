"""scatterbrain: the paper's formula written out a query at a time, its two limits (empty support: Performer;
full support: softmax), causal leaks, seeds and redraws, the safe denominator, option checks, no [T, T] tile."""

from __future__ import annotations

import math

import pytest
import torch

import attnkit
from attnkit.errors import InvalidOption
from attnkit.ops import bucketed
from attnkit.ops.lsh import angular_buckets
from attnkit.testing import assert_close, make_qkv

PATTERNS = ("noncausal_self", "causal_self", "noncausal_cross", "causal_cross")


def scatterbrain_literal(q, k, v, w, rot, pattern):
    """fp64, a query at a time: out_i = (sum_j phi_i.phi_j v_j + sum_{j in S_i} (exp(s_ij) - phi_i.phi_j) v_j) /
    (the same with 1 for v_j), phi(x) = exp(W x - |x|^2/2) / sqrt(m), x = q d^(-1/4); S_i: the keys sharing an
    LSH bucket with query i in some round; j over the keys the pattern lets i see."""
    b, tq, hq, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    m = w.shape[0]

    def phi(x):
        x = x * d**-0.25
        return torch.exp(w @ x - 0.5 * x @ x) / math.sqrt(m)

    out = torch.zeros(b, tq, hq, v.shape[-1], dtype=torch.float64)
    for bi in range(b):
        for h in range(hq):
            kh = h // (hq // hkv)
            for i in range(tq):
                qi = q[bi, i, h]
                num, den = 0.0, 0.0
                for j in range(tk):
                    if pattern == "causal_self" and j > i:
                        continue
                    kj = k[bi, j, kh]
                    low = phi(qi) @ phi(kj)
                    shared = bool((angular_buckets(qi, rot) == angular_buckets(kj, rot)).any())
                    weight = low + ((torch.exp(qi @ kj / math.sqrt(d)) - low) if shared else 0.0)
                    num, den = num + weight * v[bi, j, kh], den + weight
                out[bi, i, h] = num / den
    return out


@pytest.mark.parametrize("pattern", PATTERNS)
def test_reference_and_fast_path_equal_the_papers_formula(pattern):
    mech = attnkit.create("scatterbrain", num_features=12, n_buckets=4, n_hashes=2, seed=3, block_size=4, chunk_size=4)
    tk = 11 if pattern.endswith("self") else 7
    q, k, v = make_qkv(2, 11, tk, 4, 2, 8, dtype=torch.float64)
    cpu = torch.device("cpu")
    want = scatterbrain_literal(
        q, k, v, mech.projection(8, cpu, torch.float64), mech.rotations(8, cpu, torch.float64), pattern
    )
    for path in ("reference", "bucketed"):
        assert_close(f"{pattern} {path}", want, mech(q, k, v, pattern=pattern, path=path), 1e-10)


def _along(direction: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    return direction * sizes  # [B, T, H, 1] positive multiples of one direction


@pytest.mark.parametrize("pattern", ["noncausal_self", "causal_self", "noncausal_cross"])
def test_full_support_is_softmax_and_empty_support_is_performer(pattern):
    g = torch.Generator().manual_seed(0)
    u = torch.randn(16, generator=g, dtype=torch.float64)
    tk = 25 if pattern.endswith("self") else 13
    q = _along(u, torch.rand(2, 25, 2, 1, generator=g, dtype=torch.float64) + 0.2)
    k = _along(u, torch.rand(2, tk, 2, 1, generator=g, dtype=torch.float64) + 0.2)
    v = torch.randn(2, tk, 2, 16, generator=g, dtype=torch.float64)
    mech = attnkit.create("scatterbrain", num_features=32, n_buckets=8, seed=5)
    # q and k along one direction share every bucket: every visible pair is exact
    want = attnkit.attend(q, k, v, "softmax", pattern=pattern)
    assert_close("full support", want, mech(q, k, v, pattern=pattern, path="bucketed"), 1e-10)
    # keys along the opposite direction never share a bucket (LSH of -x is LSH of x shifted by n/2): Performer
    performer = attnkit.create("performer", num_features=32, seed=mech.draw_seed, eps=1e-300)
    want = performer(q, -k, v, pattern=pattern)
    for path in ("reference", "bucketed"):
        assert_close(f"empty support {path}", want, mech(q, -k, v, pattern=pattern, path=path), 1e-10)


@pytest.mark.parametrize("path", ["reference", "bucketed"])
def test_future_tokens_never_change_past_outputs(path):
    mech = attnkit.create("scatterbrain", num_features=16, n_buckets=6, n_hashes=2, seed=2, block_size=4, chunk_size=8)
    q, k, v = make_qkv(1, 60, 60, 2, 2, 16)
    out = mech(q, k, v, pattern="causal_self", path=path)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for t in (q2, k2, v2):
        t[:, 30:] = torch.randn_like(t[:, 30:]) * 3
    moved = mech(q2, k2, v2, pattern="causal_self", path=path)
    assert_close("past", out[:, :30], moved[:, :30], 2e-6)
    assert (out[:, 30:] - moved[:, 30:]).abs().max() > 1e-2


@pytest.mark.parametrize("pattern", ["noncausal_self", "causal_self"])
def test_large_scores_stay_finite_and_are_averages_of_values(pattern):
    """Every weight (phi.phi off the support, exp(s) on it) is positive, so each output is a convex combination of
    the values: with the safe denominator that holds even when exp(s) and phi.phi are far apart."""
    q, k, v = make_qkv(2, 50, 50, 2, 2, 16, requires_grad=True)
    mech = attnkit.create("scatterbrain", num_features=16, n_buckets=4, seed=1, block_size=4)
    for path in ("reference", "bucketed"):
        out = mech(q * 4, k * 4, v, pattern=pattern, path=path)
        assert torch.isfinite(out).all()
        assert (out <= v.max() + 1e-4).all() and (out >= v.min() - 1e-4).all()
        grads = torch.autograd.grad(out.sum(), (q, k, v))
        assert all(torch.isfinite(gr).all() for gr in grads)


def test_seed_reproduces_and_redraw_changes_features_and_rotations():
    a = attnkit.create("scatterbrain", seed=7)
    b = attnkit.create("scatterbrain", seed=7)
    cpu, f32 = torch.device("cpu"), torch.float32
    w, r = a.projection(16, cpu, f32), a.rotations(16, cpu, f32)
    assert w.shape == (256, 16) and r.shape == (1, 16, 32)
    assert torch.equal(w, b.projection(16, cpu, f32)) and torch.equal(r, b.rotations(16, cpu, f32))
    a.redraw(8)
    assert not torch.equal(w, a.projection(16, cpu, f32)) and not torch.equal(r, a.rotations(16, cpu, f32))
    a.redraw(7)
    assert torch.equal(w, a.projection(16, cpu, f32)) and torch.equal(r, a.rotations(16, cpu, f32))


@pytest.mark.parametrize(
    "bad",
    [
        {"num_features": 0},
        {"num_features": 2**70},
        {"num_features": 1.5},
        {"n_buckets": 5},
        {"n_buckets": -2},
        {"n_hashes": 0},
        {"seed": -3},
        {"chunk_size": 0},
        {"block_size": "8"},
    ],
)
def test_bad_options_raise(bad):
    (name,) = bad
    with pytest.raises(InvalidOption, match=name):
        attnkit.create("scatterbrain", **bad)


def test_fast_path_never_builds_a_t_by_t_tile(monkeypatch):
    seen = []
    real = torch.bmm

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.append(out.shape)
        return out

    monkeypatch.setattr(bucketed.torch, "bmm", spy)
    t = 512
    q, k, v = make_qkv(1, t, t, 2, 2, 16)
    mech = attnkit.create("scatterbrain", num_features=32, n_buckets=32, seed=0)
    mech(q, k, v, pattern="noncausal_self", path="bucketed")
    assert seen
    assert all(s[1] < t / 4 and s[2] < t / 4 for s in seen if s[2] != 16)  # tiles (not products with v) are small
    assert max(math.prod(s) for s in seen) <= bucketed.CHUNK_SCORES
