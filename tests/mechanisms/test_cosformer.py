"""cosformer: the paper's re-weighted attention written out, max_len, positions in chunks and cross patterns."""

from __future__ import annotations

import math

import pytest
import torch
from kernel_literal import pairwise_kernel_attention

import attnkit
from attnkit.errors import InvalidOption
from attnkit.testing import assert_close, make_qkv, rel_rmse

PATTERNS = ("noncausal_self", "causal_self", "noncausal_cross", "causal_cross")


def cosformer_literal(q, k, v, pattern, max_len, eps=1e-6):
    """The paper, one pair at a time in fp64: s_ij = relu(q_i).relu(k_j) cos(pi/2 (i - j) / M),
    out_i = sum_j s_ij v_j / (sum_j s_ij + eps) over the keys query i sees (queries and keys numbered from 0)."""

    def s(qi, kj, i, j, h):
        return torch.relu(qi) @ torch.relu(kj) * math.cos(math.pi / 2 * (i - j) / max_len)

    return pairwise_kernel_attention(q, k, v, pattern, s, eps)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_reference_and_paths_equal_the_papers_formula(pattern):
    tk = 11 if pattern.endswith("self") else 7
    q, k, v = make_qkv(2, 11, tk, 4, 2, 8, dtype=torch.float64)
    mech = attnkit.create("cosformer", max_len=16)  # short M: the re-weighting is far from flat
    want = cosformer_literal(q, k, v, pattern, 16)
    assert_close("reference", want, mech(q, k, v, pattern=pattern, path="reference"), 1e-9)
    assert_close("auto", want, mech(q, k, v, pattern=pattern), 1e-9)


def test_features_give_the_cos_reweighted_scores():
    m = 12
    q, k, v = make_qkv(1, m, m, 1, 1, 4, dtype=torch.float64)
    mech = attnkit.create("cosformer", max_len=m)
    x = attnkit.inputs.AttentionInputs(q, k, v, attnkit.Pattern.NONCAUSAL_SELF, 1.0, None, None, False)
    s = torch.einsum("bqhf,bkhf->bqk", mech.features(x, "q"), mech.features(x, "k"))[0]  # [T, T]
    want = torch.relu(q[0, :, 0]) @ torch.relu(k[0, :, 0]).T
    i = torch.arange(m, dtype=torch.float64)
    want = want * torch.cos(math.pi / 2 * (i[:, None] - i[None, :]) / m)
    assert torch.allclose(s, want, atol=1e-12)


def test_positions_beyond_max_len_raise_before_compute():
    q, k, v = make_qkv(1, 20, 20, 2, 2, 8)
    mech = attnkit.create("cosformer", max_len=16)
    mech(q[:, :16], k[:, :16], v[:, :16], pattern="causal_self")  # positions 0..15: fine
    with pytest.raises(InvalidOption, match="max_len=16.*position 16"):
        mech(q[:, :17], k[:, :17], v[:, :17], pattern="causal_self")
    _, st = mech(q[:, :10], k[:, :10], v[:, :10], pattern="causal_self", return_state=True)
    mech(q[:, 10:16], k[:, 10:16], v[:, 10:16], pattern="causal_self", state=st)
    with pytest.raises(InvalidOption, match="position 16"):  # 10 tokens before + 7 = position 16
        mech(q[:, 10:17], k[:, 10:17], v[:, 10:17], pattern="causal_self", state=st)
    with pytest.raises(InvalidOption, match="max_len"):  # a context longer than M
        mech(q[:, :4], k, v, pattern="noncausal_cross")


def test_chunked_positions_continue():
    """The second chunk's tokens sit at positions 30.. : the same as in one call (and not if numbered from 0)."""
    q, k, v = make_qkv(1, 40, 40, 2, 2, 8)
    mech = attnkit.create("cosformer", max_len=48)
    full = mech(q, k, v, pattern="causal_self")
    _, st = mech(q[:, :30], k[:, :30], v[:, :30], pattern="causal_self", return_state=True)
    assert_close(
        "continued", full[:, 30:], mech(q[:, 30:], k[:, 30:], v[:, 30:], pattern="causal_self", state=st), 1e-5
    )
    fresh = mech(q[:, 30:], k[:, 30:], v[:, 30:], pattern="causal_self")
    assert rel_rmse(full[:, 30:], fresh) > 1e-2


def test_max_len_is_what_sets_the_reweighting_not_the_call_length():
    q, k, v = make_qkv(1, 30, 30, 2, 2, 8)
    short = attnkit.attend(q, k, v, "cosformer", pattern="causal_self", max_len=32)
    long = attnkit.attend(q, k, v, "cosformer", pattern="causal_self", max_len=4096)
    assert rel_rmse(long, short) > 1e-2
    prefix = attnkit.attend(q[:, :10], k[:, :10], v[:, :10], "cosformer", pattern="causal_self", max_len=32)
    assert_close("prefix", short[:, :10], prefix, 1e-5)


def test_cross_keys_count_real_keys_only():
    """A context padded on the left gives the same outputs: keys are numbered by their rank among real keys."""
    q, k, v = make_qkv(2, 5, 9, 2, 2, 8, dtype=torch.float64)
    mech = attnkit.create("cosformer", max_len=16)
    want = cosformer_literal(q, k, v, "noncausal_cross", 16)
    kp = torch.cat([torch.randn(2, 3, 2, 8, dtype=torch.float64), k], dim=1)
    vp = torch.cat([torch.randn(2, 3, 2, 8, dtype=torch.float64), v], dim=1)
    kpm = torch.ones(2, 12, dtype=torch.bool)
    kpm[:, :3] = False
    for pattern in ("noncausal_cross", "causal_cross"):
        assert_close(pattern, want, mech(q, kp, vp, pattern=pattern, key_padding_mask=kpm), 1e-9)


def test_state_holds_2d_features():
    q, k, v = make_qkv(2, 30, 30, 4, 2, 16, 8)
    _, st = attnkit.attend(q, k, v, "cosformer", pattern="causal_self", return_state=True)
    assert st.S.shape == (2, 2, 32, 8) and st.z.shape == (2, 2, 32) and st.offset == 30
    shape = attnkit.mechanism.Shape(2, 30, 30, 4, 2, 16, 8)
    mech = attnkit.create("cosformer")
    assert mech.state_bytes(shape) == st.nbytes
    b, t, hq, hkv, f, dv1 = 2, 30, 4, 2, 32, 8 + 1  # noncausal: phi(K)^T [V, 1] per kv head, read per query head
    assert mech.flops(shape, attnkit.Pattern.NONCAUSAL_SELF) == b * (2 * t * f * dv1 * hkv + 2 * t * f * dv1 * hq)


@pytest.mark.parametrize("bad", [{"max_len": 0}, {"eps": -1.0}, {"chunk_size": 0}])
def test_bad_options_raise(bad):
    with pytest.raises(InvalidOption, match=next(iter(bad))):
        attnkit.create("cosformer", **bad)
