"""kernel_rpe_fft: the paper's formula written out in fp64; fft, banded and direct against it (clipped and
unclipped RPE, GQA, gradients into b); the random features estimate softmax with an additive RPE."""

from __future__ import annotations

import math

import pytest
import torch

import attnkit
from attnkit.errors import AttnkitError, InvalidOption
from attnkit.mechanism import Shape
from attnkit.testing import assert_close, make_qkv


def build(heads=4, head_dim=8, seed_b=0, **options):
    mech = attnkit.create("kernel_rpe_fft", heads=heads, head_dim=head_dim, **options)
    with torch.no_grad():  # a generic RPE, not the smooth ALiBi start
        mech.rpe.copy_(torch.randn(mech.rpe.shape, generator=torch.Generator().manual_seed(seed_b)))
    return mech


def literal(mech, q, k, v, causal, scale=None):
    """z_i = sum_j c_(i-j) phi(q_i) phi(k_j)^T v_j / sum_j c_(i-j) phi(q_i) phi(k_j)^T, with loops."""
    b, t, h, d = q.shape
    g = h // k.shape[2]
    scale = 1 / math.sqrt(d) if scale is None else scale
    w, m, n = mech.projection.double(), mech.options.features, mech.options.max_len
    rpe = mech.rpe.detach().double()

    def phi(x):
        if mech.options.normalize:
            x = x / x.norm(dim=-1, keepdim=True) * math.sqrt(d)
        x = x * math.sqrt(scale)
        return torch.exp(x @ w.T - (x * x).sum(-1, keepdim=True) / 2) / math.sqrt(m)

    phi_q, phi_k = phi(q), phi(k)  # [B, T, H, m], [B, T, Hkv, m]
    out = torch.zeros(b, t, h, v.shape[-1], dtype=torch.float64)
    for head in range(h):
        for i in range(t):
            num, den = 0.0, 0.0
            for j in range(i + 1 if causal else t):
                dist = max(-(n - 1), min(n - 1, i - j))  # clipped at max_len - 1
                a = math.exp(rpe[head, dist + n - 1]) * (phi_q[:, i, head] * phi_k[:, j, head // g]).sum(-1)
                num, den = num + a[:, None] * v[:, j, head // g], den + a[:, None]
            out[:, i, head] = num / den
    return out


@pytest.mark.parametrize("pattern", ["causal_self", "noncausal_self"])
@pytest.mark.parametrize("options", [{"max_len": 4}, {"max_len": 40, "normalize": False, "features": 5}])
def test_every_path_equals_the_formula(pattern, options):
    mech = build(eps=1e-300, **options)
    q, k, v = make_qkv(2, 11, 11, 4, 2, 8, dtype=torch.float64)
    expected = literal(mech, q, k, v, causal=pattern == "causal_self")
    for path in ("reference", "fft", "banded", "direct"):
        assert_close(path, expected, mech(q, k, v, pattern=pattern, path=path), 1e-10)


@pytest.mark.parametrize("pattern", ["causal_self", "noncausal_self"])
def test_paths_agree_on_long_sequences_with_their_gradients(pattern):
    """T = 150 with max_len 20 (the band is narrow) and 512 (it covers everything); GQA; grads into b too."""
    q, k, v = make_qkv(1, 150, 150, 4, 1, 8, dtype=torch.float64, requires_grad=True)
    for max_len in (20, 512):
        mech = build(max_len=max_len)
        ref = mech(q, k, v, pattern=pattern, path="reference")
        g = torch.randn_like(ref)
        ref_grads = torch.autograd.grad(ref, (q, k, v, mech.rpe), g)
        for path in ("fft", "banded"):
            out = mech(q, k, v, pattern=pattern, path=path)
            assert_close(f"{path} {max_len}", ref, out, 1e-9)
            grads = torch.autograd.grad(out, (q, k, v, mech.rpe), g)
            for name, r, f in zip(("dq", "dk", "dv", "db"), ref_grads, grads, strict=True):
                assert_close(f"{path} {max_len} {name}", r, f, 1e-8)


def test_random_features_estimate_softmax_with_the_rpe():
    """With many features and no normalisation, the mechanism approaches softmax(s q.k + b_(i-j)) v."""
    mech = build(heads=2, head_dim=8, features=4096, normalize=False, max_len=6)
    q, k, v = make_qkv(1, 24, 24, 2, 2, 8, dtype=torch.float64)
    q, k = q * 0.5, k * 0.5  # moderate scores: a low-variance estimate
    i, j = torch.arange(24)[:, None], torch.arange(24)[None, :]
    b = mech.rpe.detach().double()[:, (i - j).clamp(-5, 5) + 5]  # [H, T, T]
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(8) + b
    for pattern, mask in (("noncausal_self", None), ("causal_self", j > i)):
        s = scores if mask is None else scores.masked_fill(mask, float("-inf"))
        exact = torch.einsum("bhqk,bkhe->bqhe", s.softmax(-1), v)
        approx = mech(q, k, v, pattern=pattern)
        assert_close(pattern, exact, approx, 0.04)  # measured 0.016: error ~ 1/sqrt(features)


def test_causal_rpe_is_lower_triangular_and_relative():
    """Shifting the whole sequence right (left padding) changes no real token's output."""
    mech = build(max_len=6)
    q, k, v = make_qkv(1, 15, 15, 4, 4, 8)
    base = mech(q, k, v, pattern="causal_self", path="fft")
    pad = lambda x: torch.cat([torch.randn_like(x[:, :5]), x], 1)  # noqa: E731
    mask = torch.ones(1, 20, dtype=torch.bool)
    mask[:, :5] = False
    for path in ("fft", "banded", "direct"):
        out = mech(pad(q), pad(k), pad(v), pattern="causal_self", key_padding_mask=mask, path=path)
        assert_close(path, base, out[:, 5:], mech.tolerances[torch.float32])
        assert out[:, :5].abs().max() == 0


def test_features_are_drawn_once_from_the_seed():
    a, b = (attnkit.create("kernel_rpe_fft", heads=2, head_dim=8, seed=5) for _ in range(2))
    c = attnkit.create("kernel_rpe_fft", heads=2, head_dim=8, seed=6)
    assert torch.equal(a.projection, b.projection) and not torch.equal(a.projection, c.projection)
    w = a.projection.double()[:8]  # one orthogonal block: rows orthogonal to each other
    gram = w @ w.T
    assert_close("orthogonal", torch.diag(gram.diagonal()), gram, 1e-6)
    q, k, v = make_qkv(1, 9, 9, 2, 2, 8)
    assert torch.equal(a(q, k, v, pattern="noncausal_self"), a(q, k, v, pattern="noncausal_self"))


def test_alibi_start_and_trainable_rpe():
    mech = attnkit.create("kernel_rpe_fft", heads=4, head_dim=8, max_len=3)
    assert mech.rpe.requires_grad and mech.rpe.shape == (4, 5)
    assert torch.allclose(mech.rpe[0], torch.tensor([-0.5, -0.25, 0.0, -0.25, -0.5]))  # slope 2^-2
    zeros = attnkit.create("kernel_rpe_fft", heads=4, head_dim=8, rpe_init="zeros")
    assert zeros.rpe.abs().max() == 0
    with pytest.raises(AttnkitError, match="create"):
        q, k, v = make_qkv(1, 4, 4, 4, 4, 8)
        attnkit.attend(q, k, v, "kernel_rpe_fft", pattern="causal_self")
    for bad in (
        {"features": 0},
        {"max_len": 0},
        {"normalize": "yes"},
        {"rpe_init": "random"},
        {"eps": 0.0},
        {"seed": 2**64},
    ):
        with pytest.raises(InvalidOption):
            attnkit.create("kernel_rpe_fft", heads=4, head_dim=8, **bad)


def test_auto_path_choice_and_kv_cache_state():
    mech = attnkit.create("kernel_rpe_fft", heads=8, head_dim=64)
    assert mech.prefers_banded(Shape(1, 8192, 8192, 8, 8, 64, 64), causal=True)  # band 512 << T
    wide = attnkit.create("kernel_rpe_fft", heads=8, head_dim=64, max_len=1 << 20)
    assert not wide.prefers_banded(Shape(1, 65536, 65536, 8, 8, 64, 64), causal=False)  # the band is all of T
    q, k, v = make_qkv(1, 80, 80, 8, 8, 64)
    _, st = mech(q[:, :79], k[:, :79], v[:, :79], pattern="causal_self", return_state=True)
    assert mech.last_path == "banded" and st.k.shape[1] == 79  # a KV cache: grows with the sequence
    mech(q[:, 79:], k[:, 79:], v[:, 79:], pattern="causal_self", state=st)
    assert mech.last_path == "direct"  # decoding step
