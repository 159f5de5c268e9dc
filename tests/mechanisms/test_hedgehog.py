"""hedgehog: the paper's feature map written out, per-head maps under GQA, and attention distillation."""

from __future__ import annotations

import pytest
import torch
from kernel_literal import pairwise_kernel_attention

import attnkit
from attnkit.errors import AttnkitError, InvalidOption, ShapeError
from attnkit.mechanisms.hedgehog import distill_attention
from attnkit.ops.gqa import repeat_kv
from attnkit.testing import assert_close, make_qkv, rel_rmse

PATTERNS = ("noncausal_self", "causal_self", "noncausal_cross", "causal_cross")


def randomised(heads, head_dim, **options):
    """A hedgehog whose maps differ per head (identity at init would hide a head mix-up)."""
    mech = attnkit.create("hedgehog", heads=heads, head_dim=head_dim, **options)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        mech.weight.add_(0.5 * torch.randn(mech.weight.shape, generator=g))
        mech.bias.add_(0.5 * torch.randn(mech.bias.shape, generator=g))
    return mech


def hedgehog_literal(q, k, v, weight, bias, pattern, eps=1e-6):
    """The paper, one pair at a time in fp64: phi_h(x) = [softmax(W_h x + b_h), softmax(-(W_h x + b_h))], query
    head h maps its queries and the keys it reads with phi_h; out_i = sum_j s_ij v_j / (sum_j s_ij + eps)."""
    w, bb = weight.detach().double(), bias.detach().double()

    def phi(x, h):
        z = w[h] @ x + bb[h]
        return torch.cat([torch.softmax(z, 0), torch.softmax(-z, 0)])

    return pairwise_kernel_attention(q, k, v, pattern, lambda qi, kj, i, j, h: phi(qi, h) @ phi(kj, h), eps)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_reference_and_paths_equal_the_papers_formula(pattern):
    tk = 9 if pattern.endswith("self") else 6
    q, k, v = make_qkv(2, 9, tk, 4, 2, 8, dtype=torch.float64)
    mech = randomised(4, 8, feature_dim=6)
    want = hedgehog_literal(q, k, v, mech.weight, mech.bias, pattern)
    assert_close("reference", want, mech(q, k, v, pattern=pattern, path="reference"), 1e-9)
    assert_close("auto", want, mech(q, k, v, pattern=pattern), 1e-9)


def test_maps_start_at_identity_and_are_trainable():
    torch.manual_seed(0)
    mech = attnkit.create("hedgehog", heads=3, head_dim=8, feature_dim=5)
    assert mech.weight.shape == (3, 5, 8) and mech.bias.shape == (3, 5)
    assert torch.equal(mech.weight[1], torch.eye(5, 8)) and not mech.bias.any()
    q, k, v = make_qkv(1, 12, 12, 3, 3, 8)
    mech(q, k, v, pattern="causal_self").square().sum().backward()
    assert mech.weight.grad.abs().sum() > 0 and torch.isfinite(mech.weight.grad).all()
    assert mech.bias.grad.abs().sum() > 0


def test_gqa_equals_repeating_kv_with_distinct_maps():
    q, k, v = make_qkv(2, 15, 15, 4, 1, 8)
    mech = randomised(4, 8)
    for pattern in ("causal_self", "noncausal_self"):
        grouped = mech(q, k, v, pattern=pattern)
        assert_close(pattern, mech(q, repeat_kv(k, 4), repeat_kv(v, 4), pattern=pattern), grouped, 1e-5)
    # each head uses its own map: changing head 2's map changes head 2 only
    before = mech(q, k, v, pattern="causal_self")
    with torch.no_grad():
        mech.weight[2] += torch.randn(8, 8, generator=torch.Generator().manual_seed(5))  # (a constant would cancel)
    after = mech(q, k, v, pattern="causal_self")
    assert torch.equal(before[:, :, [0, 1, 3]], after[:, :, [0, 1, 3]])
    assert rel_rmse(before[:, :, 2], after[:, :, 2]) > 1e-3


def test_state_is_per_query_head():
    mech = randomised(4, 8, feature_dim=5)
    q, k, v = make_qkv(2, 20, 20, 4, 2, 8, 6)
    full = mech(q, k, v, pattern="causal_self")
    _, st = mech(q[:, :13], k[:, :13], v[:, :13], pattern="causal_self", return_state=True)
    assert st.S.shape == (2, 4, 10, 6) and st.z.shape == (2, 4, 10)
    rest = mech(q[:, 13:], k[:, 13:], v[:, 13:], pattern="causal_self", state=st)
    assert_close("continued", full[:, 13:], rest, 1e-5)
    shape = attnkit.mechanism.Shape(2, 20, 20, 4, 2, 8, 6)
    assert mech.state_bytes(shape) == st.nbytes
    b, t, h, f2, d, dv1 = 2, 20, 4, 10, 8, 6 + 1  # noncausal: per query head, plus the maps (F = 5 outputs each)
    want = b * (2 * t * f2 * dv1 * h + 2 * t * f2 * dv1 * h) + 2 * b * h * 2 * t * 5 * d
    assert mech.flops(shape, attnkit.Pattern.NONCAUSAL_SELF) == want


def test_distillation_loss_is_the_cross_entropy_of_attention_weights():
    q, k, _ = make_qkv(2, 7, 7, 4, 2, 8, dtype=torch.float64)
    mech = randomised(4, 8)
    kpm = torch.ones(2, 7, dtype=torch.bool)
    kpm[0, :2] = False  # queries 0 and 1 of row 0 see no real key (causal): left out of the mean
    loss = distill_attention(q, k, mech, pattern="causal_self", key_padding_mask=kpm)
    total, rows = 0.0, 0
    for b in range(2):
        for h in range(4):
            kh = k[b, :, h // 2]
            for i in range(7):
                seen = [j for j in range(i + 1) if kpm[b, j]]
                if not seen:
                    continue
                a = torch.softmax(torch.stack([q[b, i, h] @ kh[j] / 8**0.5 for j in seen]), 0)
                w, bb = mech.weight[h].detach().double(), mech.bias[h].detach().double()

                def phi(x, w=w, bb=bb):
                    z = w @ x + bb
                    return torch.cat([torch.softmax(z, 0), torch.softmax(-z, 0)])

                s = torch.stack([phi(q[b, i, h]) @ phi(kh[j]) for j in seen])
                total, rows = total - (a * torch.log(s / s.sum())).sum(), rows + 1
    assert torch.allclose(loss, total / rows, rtol=1e-10)


def test_distillation_makes_hedgehog_mimic_softmax():
    """A few hundred Adam steps on clustered q, k (attention with structure, as in trained models) cut the
    KL from softmax's weights several-fold and bring the output closer to softmax's, also on held-out data."""
    heads, d, t, b = 2, 16, 32, 8
    centres = torch.randn(heads, 8, d, generator=torch.Generator().manual_seed(0)) * 1.5

    def data(seed):
        g = torch.Generator().manual_seed(seed)

        def mixture():
            pick = torch.randint(0, 8, (b, t, heads), generator=g)
            return centres[torch.arange(heads), pick] + 0.5 * torch.randn(b, t, heads, d, generator=g)  # [B,T,H,D]

        return mixture(), mixture(), torch.randn(b, t, heads, d, generator=g)

    def entropy(q, k):  # the teacher's own entropy: cross-entropy minus it is the KL
        s = torch.einsum("bqhd,bkhd->bhqk", q, k) / d**0.5
        p = s.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf")).softmax(-1)
        return -(p * p.clamp_min(1e-30).log()).sum(-1).mean()

    torch.manual_seed(0)
    mech = attnkit.create("hedgehog", heads=heads, head_dim=d)
    (q, k, _), (qt, kt, vt) = data(1), data(2)
    softmax_out = attnkit.attend(qt, kt, vt, pattern="causal_self")

    def kl(q, k):
        return (distill_attention(q, k, mech) - entropy(q, k)).item()

    def error():
        with torch.no_grad():
            return rel_rmse(softmax_out, mech(qt, kt, vt, pattern="causal_self"))

    kl0, held0, err0 = kl(q, k), kl(qt, kt), error()
    opt = torch.optim.Adam(mech.parameters(), lr=2e-2)
    for _ in range(200):
        loss = distill_attention(q, k, mech)
        opt.zero_grad()
        loss.backward()
        opt.step()
    kl1, held1, err1 = kl(q, k), kl(qt, kt), error()
    assert kl1 < kl0 / 4, (kl0, kl1)
    assert held1 < held0 / 3, (held0, held1)
    assert err1 < 0.7 * err0, (err0, err1)


def test_errors():
    q, k, v = make_qkv(1, 6, 6, 2, 2, 8)
    with pytest.raises(InvalidOption, match="heads="):
        attnkit.create("hedgehog")
    with pytest.raises(AttnkitError, match="create"):
        attnkit.attend(q, k, v, "hedgehog", pattern="causal_self")
    mech = attnkit.create("hedgehog", heads=2, head_dim=16)
    with pytest.raises(ShapeError, match="head_dim 16"):
        mech(q, k, v, pattern="causal_self")
    with pytest.raises(TypeError, match="hedgehog"):
        distill_attention(q, k, attnkit.create("linear"))
    with pytest.raises(InvalidOption, match="feature_dim"):
        attnkit.create("hedgehog", heads=2, head_dim=8, feature_dim=0)
    student = attnkit.create("hedgehog", heads=2, head_dim=8)
    for scale in (float("nan"), -3.0, 0):  # a NaN scale used to give a loss of exactly 0
        with pytest.raises(InvalidOption, match="scale"):
            distill_attention(q, k, student, scale=scale)
