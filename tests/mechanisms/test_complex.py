"""complex: the reference against the complex-number formula written with Python complex numbers; at init
it is softmax attention with RoPE; the sdpa path agrees with learned, head-specific parameters."""

from __future__ import annotations

import cmath
import math

import pytest
import torch

import attnkit
from attnkit.errors import InvalidOption, UnsupportedPattern
from attnkit.ops.rope import apply_rope
from attnkit.testing import assert_close, make_qkv


@torch.no_grad()
def formula(mech, q, k, v, causal, q_offset=0):
    """A_mn = scale Re sum_j r^q r^k exp(i (beta_h (theta^q - theta^k) + (m - n) omega_hj)), softmax, values."""
    b, tq, h, d = q.shape
    j_dims, g = d // 2, h // k.shape[2]
    out = torch.zeros(b, tq, h, v.shape[-1], dtype=torch.float64)
    for i in range(b):
        for head in range(h):
            beta = float(mech.adapt[head])
            for m in range(tq):
                zq = [complex(q[i, m, head, j], q[i, m, head, j + j_dims]) for j in range(j_dims)]
                keys = m + q_offset + 1 if causal else k.shape[1]
                scores = []
                for n in range(keys):
                    zk = [complex(k[i, n, head // g, j], k[i, n, head // g, j + j_dims]) for j in range(j_dims)]
                    total = 0j
                    for j in range(j_dims):
                        semantic = cmath.phase(zq[j]) - cmath.phase(zk[j])  # AS_mn
                        rotation = beta * semantic + (m + q_offset - n) * float(mech.freqs[head, j])
                        total += abs(zq[j]) * abs(zk[j]) * cmath.exp(1j * rotation)
                    scores.append(total.real / math.sqrt(d))
                p = torch.tensor(scores, dtype=torch.float64).softmax(0)
                out[i, m, head] = (p[:, None] * v[i, :keys, head // g].double()).sum(0)
    return out


def build(heads=4, head_dim=8, **options):
    torch.manual_seed(0)
    mech = attnkit.create("complex", heads=heads, head_dim=head_dim, **options)
    with torch.no_grad():  # head-specific parameters, as after training
        mech.adapt.copy_(torch.tensor([1.0, 0.6, -0.8, 1.7])[:heads])
        mech.freqs.mul_(torch.rand(heads, head_dim // 2) + 0.5)
    return mech


@pytest.mark.parametrize("path", ["reference", "sdpa"])
@pytest.mark.parametrize("pattern", ["causal_self", "noncausal_self"])
def test_matches_the_complex_formula(pattern, path):
    mech = build()
    q, k, v = make_qkv(2, 7, 7, 4, 2, 8, dtype=torch.float64)
    out = mech(q, k, v, pattern=pattern, path=path)
    assert_close(path, formula(mech, q, k, v, pattern == "causal_self"), out, 1e-10)


def test_cache_positions_continue():
    mech = build()
    q, k, v = make_qkv(1, 9, 9, 4, 4, 8, dtype=torch.float64)
    _, cache = mech(q[:, :5], k[:, :5], v[:, :5], pattern="causal_self", return_state=True)
    rest = mech(q[:, 5:], k[:, 5:], v[:, 5:], pattern="causal_self", state=cache, path="sdpa")
    expect = formula(mech, q[:, 5:], k, v, causal=True, q_offset=5)
    assert_close("after cache", expect, rest, 1e-10)


@pytest.mark.parametrize("path", ["reference", "sdpa"])
def test_at_init_it_is_rope_attention(path):
    torch.manual_seed(0)
    mech = attnkit.create("complex", heads=4, head_dim=16)
    q, k, v = make_qkv(2, 33, 33, 4, 2, 16)
    pos = torch.arange(33)
    rope = attnkit.attend(apply_rope(q, pos), apply_rope(k, pos), v, pattern="causal_self")
    assert_close("rope", rope, mech(q, k, v, pattern="causal_self", path=path), 1e-5)


def test_sdpa_gradients_reach_the_head_parameters():
    mech = build(head_dim=16)
    q, k, v = make_qkv(2, 40, 40, 4, 1, 16, requires_grad=True)
    g = torch.randn(2, 40, 4, 16)
    grads = {}
    for path in ("reference", "sdpa"):
        out = mech(q, k, v, pattern="causal_self", path=path)
        grads[path] = torch.autograd.grad(out, [q, k, v, mech.adapt, mech.freqs], g)
    for name, r, f in zip(("dq", "dk", "dv", "dadapt", "dfreqs"), grads["reference"], grads["sdpa"], strict=True):
        assert r.abs().sum() > 0
        assert_close(name, r, f, 1e-4)


def test_zero_pairs_have_finite_gradients():
    mech = build(head_dim=8)
    q, k, v = make_qkv(1, 6, 6, 4, 4, 8, requires_grad=True)
    with torch.no_grad():
        q[:, 2, :, 0], q[:, 2, :, 4] = 0.0, 0.0  # the first complex dim of token 2 is 0 + 0i
    out = mech(q, k, v, pattern="causal_self", path="sdpa")
    assert all(torch.isfinite(t).all() for t in torch.autograd.grad(out.sum(), (q, k, v)))


def test_needs_an_even_head_dim_and_self_patterns():
    with pytest.raises(InvalidOption, match="even"):
        attnkit.create("complex", heads=2, head_dim=7)
    mech = build()
    q, k, v = make_qkv(1, 4, 6, 4, 4, 8)
    with pytest.raises(UnsupportedPattern, match="noncausal_cross"):
        mech(q, k, v, pattern="noncausal_cross")


def test_cache_holds_rotated_keys_per_query_head():
    """A decoding step rotates one key: the cache keeps every key already rotated, one per query head."""
    from attnkit.ops.gqa import repeat_kv

    mech = build(head_dim=16)
    q, k, v = make_qkv(2, 12, 12, 4, 2, 16)
    _, state = mech(q, k, v, pattern="causal_self", return_state=True, path="sdpa")
    with torch.no_grad():
        expect = mech.rotate(repeat_kv(k, 2), torch.arange(12))
    assert state.k.shape == (2, 12, 4, 16) and state.v.shape == (2, 12, 4, 16)
    assert_close("rotated keys", expect, state.k, 1e-6)
    assert state.nbytes == 2 * 12 * 4 * 32 * 4
