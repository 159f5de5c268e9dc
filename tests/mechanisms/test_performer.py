"""performer: the paper's FAVOR+ formula written out, the random features, seeds and redraws, stability."""

from __future__ import annotations

import math

import pytest
import torch
from kernel_literal import pairwise_kernel_attention

import attnkit
from attnkit.errors import InvalidOption
from attnkit.ops.feature_maps import orthogonal_gaussian
from attnkit.testing import assert_close, make_qkv, rel_rmse

PATTERNS = ("noncausal_self", "causal_self", "noncausal_cross", "causal_cross")


def favor_literal(q, k, v, w, pattern):
    """The paper, a query and a key at a time in fp64: phi(x) = exp(W x - |x|^2/2) / sqrt(m), x = q d^(-1/4),
    out_i = sum_j phi(q_i).phi(k_j) v_j / sum_j phi(q_i).phi(k_j) over the keys query i sees. No stabiliser."""
    d = q.shape[-1]
    m = w.shape[0]

    def phi(x):
        x = x * d**-0.25
        return torch.exp(w @ x - 0.5 * x @ x) / math.sqrt(m)

    return pairwise_kernel_attention(q, k, v, pattern, lambda qi, kj, i, j, h: phi(qi) @ phi(kj))


@pytest.mark.parametrize("pattern", PATTERNS)
def test_reference_and_paths_equal_the_papers_formula(pattern):
    tk = 9 if pattern.endswith("self") else 6
    q, k, v = make_qkv(2, 9, tk, 4, 2, 8, dtype=torch.float64)
    mech = attnkit.create("performer", num_features=12, seed=4, eps=1e-300)  # eps negligible: the pure ratio
    want = favor_literal(q, k, v, mech.projection(8, dtype=torch.float64), pattern)
    assert_close("reference", want, mech(q, k, v, pattern=pattern, path="reference"), 1e-9)
    assert_close("auto", want, mech(q, k, v, pattern=pattern), 1e-9)


def test_random_features_are_orthogonal_blocks_with_chi_norms():
    m, d = 40, 16
    w = orthogonal_gaussian(m, d, seed=1)
    assert w.shape == (m, d) and w.dtype == torch.float64
    unit = w / w.norm(dim=1, keepdim=True)
    for start in range(0, m, d):  # blocks of d rows, the last one cut to m mod d = 8 rows
        block = unit[start : start + d]
        assert torch.allclose(block @ block.T, torch.eye(block.shape[0], dtype=torch.float64), atol=1e-12)
    assert not torch.allclose(unit[:d] @ unit[d : 2 * d].T, torch.zeros(d, d, dtype=torch.float64), atol=1e-3)
    norms = orthogonal_gaussian(4096, d, seed=2).norm(dim=1)
    assert norms.std() > 0.3  # chi-distributed, not a constant sqrt(d)
    assert abs(norms.square().mean().item() - d) < 0.05 * d  # E |w|^2 = d
    assert torch.equal(w, orthogonal_gaussian(m, d, seed=1))
    assert not torch.equal(w, orthogonal_gaussian(m, d, seed=3))


def test_features_estimate_the_softmax_kernel_without_bias():
    """E[phi(x).phi(y)] = exp(q.k / sqrt(d)): the mean over seeds lands within 3 standard errors.

    This fails when the rows of W are not Gaussian-distributed (unit norms, or LAPACK's QR signs left as
    they are: both bias the estimate by several standard errors here)."""
    d, m = 8, 4096
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    xq, xk = q * d**-0.25, k * d**-0.25
    est = []
    for seed in range(40):
        w = orthogonal_gaussian(m, d, seed)
        est.append(((torch.exp(w @ xq - xq @ xq / 2) @ torch.exp(w @ xk - xk @ xk / 2)) / m).item())
    est = torch.tensor(est, dtype=torch.float64)
    target = math.exp(q @ k / math.sqrt(d))
    assert abs(est.mean().item() - target) < 3 * est.std().item() / math.sqrt(len(est))


def test_error_from_softmax_falls_with_more_features():
    errs = {}
    for m in (16, 1024):
        e = []
        for seed in range(3):
            q, k, v = make_qkv(1, 64, 64, 4, 4, 16, seed=seed)
            exact = attnkit.attend(q * 0.5, k * 0.5, v, pattern="noncausal_self")
            approx = attnkit.attend(
                q * 0.5, k * 0.5, v, "performer", pattern="noncausal_self", num_features=m, seed=seed
            )
            e.append(rel_rmse(exact, approx))
        errs[m] = sum(e) / len(e)
    assert errs[1024] < errs[16] / 3 and errs[1024] < 0.1, errs


def test_same_seed_same_features_everywhere():
    q, k, v = make_qkv(2, 20, 20, 4, 2, 16)
    a = attnkit.create("performer", seed=5, num_features=32)(q, k, v, pattern="causal_self")
    b = attnkit.create("performer", seed=5, num_features=32)(q, k, v, pattern="causal_self")
    c = attnkit.attend(q, k, v, "performer", pattern="causal_self", seed=5, num_features=32)
    assert torch.equal(a, b) and torch.equal(a, c)
    other = attnkit.attend(q, k, v, "performer", pattern="causal_self", seed=6, num_features=32)
    assert rel_rmse(a, other) > 1e-3


def test_seed_none_draws_once_at_create_and_is_saved():
    q, k, v = make_qkv(1, 12, 12, 2, 2, 16)
    torch.manual_seed(1)
    m1 = attnkit.create("performer", num_features=32)
    torch.manual_seed(1)
    m2 = attnkit.create("performer", num_features=32)
    m3 = attnkit.create("performer", num_features=32)  # a later draw of the global generator
    out = m1(q, k, v, pattern="noncausal_self")
    assert torch.equal(out, m1(q, k, v, pattern="noncausal_self"))  # the same features on every call
    assert torch.equal(out, m2(q, k, v, pattern="noncausal_self"))
    assert rel_rmse(out, m3(q, k, v, pattern="noncausal_self")) > 1e-3
    m3.load_state_dict(m1.state_dict())  # the drawn seed travels with the module
    assert torch.equal(out, m3(q, k, v, pattern="noncausal_self"))


def test_redraw_changes_the_features():
    q, k, v = make_qkv(1, 12, 12, 2, 2, 16)
    mech = attnkit.create("performer", num_features=32, seed=5)
    before = mech(q, k, v, pattern="causal_self")
    mech.redraw()
    assert rel_rmse(before, mech(q, k, v, pattern="causal_self")) > 1e-3
    mech.redraw(seed=5)
    assert torch.equal(before, mech(q, k, v, pattern="causal_self"))
    with pytest.raises(InvalidOption, match="seed"):
        mech.redraw(seed=-1)


def test_no_key_stabiliser_large_keys_are_finite_and_causal():
    """Keys are not shifted by a max over the call: a huge later key changes no earlier output, in one
    call or in chunks, and stays finite, since w.x - |x|^2/2 <= |w|^2/2 whatever the key."""
    q, k, v = make_qkv(1, 40, 40, 2, 2, 16)
    mech = attnkit.create("performer", num_features=64, seed=0, chunk_size=8)
    base = mech(q, k, v, pattern="causal_self")
    k2 = k.clone()
    k2[:, 30:] *= 40.0  # |k| ~ 160
    out = mech(k=k2, q=q, v=v, pattern="causal_self")
    assert torch.isfinite(out).all()
    assert torch.equal(base[:, :30], out[:, :30])
    _, st = mech(q[:, :30], k2[:, :30], v[:, :30], pattern="causal_self", return_state=True)
    tail = mech(q[:, 30:], k2[:, 30:], v[:, 30:], pattern="causal_self", state=st)
    assert_close("chunked", out[:, 30:], tail, 1e-5)
    # the bound: the key exponent peaks at |w|^2/2, for the key x = w (k = w d^(1/4))
    w = mech.projection(16)
    keys = torch.cat([w[:3] * 16**0.25, torch.randn(50, 16) * 10]).reshape(1, -1, 1, 16)
    x = attnkit.inputs.AttentionInputs(keys, keys, keys, attnkit.Pattern.NONCAUSAL_SELF, 0.25, None, None, False)
    phi = mech.features(x, "k")[0, :, 0] * math.sqrt(64)  # exp(w.x - |x|^2/2)
    bound = torch.exp(w.square().sum(-1) / 2)  # [m]
    assert (phi <= bound * (1 + 1e-5)).all()
    assert torch.allclose(phi[torch.arange(3), torch.arange(3)], bound[:3], rtol=1e-4)


def test_state_holds_m_features():
    q, k, v = make_qkv(2, 30, 30, 4, 2, 16, 8)
    _, st = attnkit.attend(q, k, v, "performer", pattern="causal_self", return_state=True, num_features=24, seed=0)
    assert st.S.shape == (2, 2, 24, 8) and st.z.shape == (2, 2, 24)
    shape = attnkit.mechanism.Shape(2, 30, 30, 4, 2, 16, 8)
    mech = attnkit.create("performer", num_features=24)
    assert mech.state_bytes(shape) == st.nbytes
    # noncausal: phi(K)^T [V, 1] per kv head, phi(Q) times it per query head, and the maps x -> W x
    b, t, hq, hkv, m, dk, dv1 = 2, 30, 4, 2, 24, 16, 8 + 1
    want = b * (2 * t * m * dv1 * hkv + 2 * t * m * dv1 * hq) + b * t * (hq + hkv) * 2 * m * dk
    assert mech.flops(shape, attnkit.Pattern.NONCAUSAL_SELF) == want


@pytest.mark.parametrize("bad", [{"num_features": 0}, {"seed": -1}, {"seed": 2**64}, {"eps": 0.0}, {"chunk_size": 0}])
def test_bad_options_raise(bad):
    with pytest.raises(InvalidOption, match=next(iter(bad))):
        attnkit.create("performer", **bad)
