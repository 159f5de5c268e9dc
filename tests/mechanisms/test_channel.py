"""channel: DaViT channel attention and XCiT's normalised form, checked against a literal loop over channels."""

from __future__ import annotations

import math

import pytest
import torch
from largest_tensor import largest_tensor

import attnkit
from attnkit.errors import InvalidOption, ShapeError, UnsupportedPattern
from attnkit.testing import assert_close, make_qkv


def literal(q, k, v, *, scale, normalize=False, real=None):
    """A per-query, per-channel loop in fp64: A[i, j] = softmax_j(scale * sum_t k[t, i] v[t, j]) over the real
    tokens t (unit channels when normalized), out[n, i] = sum_j A[i, j] q[n, j]. k, v repeated for GQA."""
    b, tq, hq, d = q.shape
    g = hq // k.shape[2]
    q, k, v = q.double(), k.double().repeat_interleave(g, 2), v.double().repeat_interleave(g, 2)
    out = torch.zeros(b, tq, hq, d, dtype=torch.float64)
    for bi in range(b):
        keep = torch.ones(k.shape[1], dtype=torch.bool) if real is None else real[bi]
        if not keep.any():
            continue  # no key: the row outputs 0
        for h in range(hq):
            kk, vv = k[bi, keep, h], v[bi, keep, h]  # [T', D]
            if normalize:
                kk, vv = kk / kk.norm(dim=0), vv / vv.norm(dim=0)
            logits = torch.tensor([[scale * sum(kk[:, i] * vv[:, j]) for j in range(d)] for i in range(d)])
            attn = logits.softmax(dim=-1)
            for n in range(tq):
                out[bi, n, h] = torch.stack([sum(attn[i, j] * q[bi, n, h, j] for j in range(d)) for i in range(d)])
    return out


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("path", ["reference", "matmul"])
def test_paths_follow_the_literal_loop(path, normalize):
    q, k, v = make_qkv(2, 9, 9, 4, 2, 5, dtype=torch.float64)
    out = attnkit.attend(q, k, v, "channel", pattern="noncausal_self", normalize=normalize, path=path)
    assert_close(path, literal(q, k, v, scale=1 / math.sqrt(5), normalize=normalize), out, 1e-10)


@pytest.mark.parametrize("path", ["reference", "matmul"])
def test_cross_reads_the_context_matrix_out_with_the_queries(path):
    q, k, v = make_qkv(2, 4, 11, 2, 1, 6, dtype=torch.float64)
    out = attnkit.attend(q, k, v, "channel", pattern="noncausal_cross", path=path, scale=0.3)
    assert out.shape == (2, 4, 2, 6)
    assert_close(path, literal(q, k, v, scale=0.3), out, 1e-10)


@pytest.mark.parametrize("path", ["reference", "matmul"])
def test_key_padding_leaves_padded_tokens_out_of_the_sums(path):
    q, k, v = make_qkv(3, 5, 8, 2, 2, 4, dtype=torch.float64)
    real = torch.tensor([[True] * 8, [True, False] * 4, [False] * 8])
    for normalize in (False, True):
        out = attnkit.attend(
            q, k, v, "channel", pattern="noncausal_cross", key_padding_mask=real, normalize=normalize, path=path
        )
        assert_close(path, literal(q, k, v, scale=0.5, normalize=normalize, real=real), out, 1e-10)
        assert out[2].abs().max() == 0


def test_one_channel_returns_the_queries():
    """With D = 1 the matrix is softmax over one entry, 1: every token's output is its query."""
    q, k, v = make_qkv(2, 7, 7, 3, 3, 1)
    for path in ("reference", "matmul"):
        out = attnkit.attend(q, k, v, "channel", pattern="noncausal_self", path=path)
        assert_close(path, q, out, 1e-6)


def test_cross_on_one_sequence_equals_self():
    q, k, v = make_qkv(2, 12, 12, 4, 2, 8)
    self_out = attnkit.attend(q, k, v, "channel", pattern="noncausal_self")
    assert_close("cross", self_out, attnkit.attend(q, k, v, "channel", pattern="noncausal_cross"), 1e-6)


def test_xcit_is_blind_to_the_scale_of_each_channel():
    """XCiT's normalisation makes the matrix independent of a positive scale per key or value channel;
    DaViT's plain covariance is not."""
    q, k, v = make_qkv(1, 10, 10, 2, 2, 6)
    scaled_k = k * torch.rand(6).add(0.5) * 3
    xcit = [attnkit.attend(q, kk, v, "channel", pattern="noncausal_self", normalize=True) for kk in (k, scaled_k)]
    assert_close("xcit", xcit[0], xcit[1], 1e-5)
    davit = [attnkit.attend(q, kk, v, "channel", pattern="noncausal_self") for kk in (k, scaled_k)]
    assert (davit[0] - davit[1]).abs().max() > 1e-3


def test_causal_patterns_and_unequal_head_dims_are_refused():
    q, k, v = make_qkv(1, 6, 6, 2, 2, 8)
    for pattern in ("causal_self", "causal_cross"):
        with pytest.raises(UnsupportedPattern, match="noncausal_cross, noncausal_self"):
            attnkit.attend(q, k, v, "channel", pattern=pattern)
    with pytest.raises(ShapeError, match="Dk == Dv; got Dk=8, Dv=4"):
        attnkit.attend(q, k, v[..., :4], "channel", pattern="noncausal_self")


def test_option_validation():
    for bad in (1, "yes"):
        with pytest.raises(InvalidOption, match="normalize"):
            attnkit.create("channel", normalize=bad)
    with pytest.raises(InvalidOption, match="normalize"):
        attnkit.create("channel", normalise=True)


def test_spatial_shape_is_optional_and_checked():
    q, k, v = make_qkv(1, 12, 12, 2, 2, 4)
    plain = attnkit.attend(q, k, v, "channel", pattern="noncausal_self")
    on_grid = attnkit.attend(q, k, v, "channel", pattern="noncausal_self", spatial_shape=(3, 4))
    assert torch.equal(plain, on_grid)
    with pytest.raises(ShapeError, match="spatial_shape"):
        attnkit.attend(q, k, v, "channel", pattern="noncausal_self", spatial_shape=(5, 3))


def test_fast_path_is_linear_in_tokens():
    """No tensor grows with T²: the largest is a [B, T, H, D] one (the output or an upcast input)."""
    t, h, d = 512, 2, 8
    q, k, v = make_qkv(1, t, t, h, 1, d)
    numel, shape = largest_tensor(lambda: attnkit.attend(q, k, v, "channel", pattern="noncausal_self", path="matmul"))
    assert numel <= t * h * d, shape
