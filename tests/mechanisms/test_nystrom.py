"""nystrom: the landmarks (ragged segments, padding), the iterative pinv, the special case m = T (exact
softmax), option checks, and that the fast path stays linear in memory."""

from __future__ import annotations

import pytest
import torch
from largest_tensor import largest_tensor

import attnkit
from attnkit.errors import InvalidOption, UnsupportedPattern
from attnkit.ops.low_rank import iterative_pinv, segment_matrix, segment_means
from attnkit.testing import assert_close, make_qkv


def softmax_attention(q, k, v):
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5
    return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v)


def test_segments_are_ragged_runs_of_real_tokens():
    # 10 tokens, 4 segments: ranks r -> floor(4 r / 10): sizes 3, 2, 3, 2
    x = torch.arange(10.0).view(1, 10, 1, 1)
    means, valid = segment_means(x, None, 4)
    assert means.flatten().tolist() == [1.0, 3.5, 6.0, 8.5] and valid.all()
    # padding at 0 and 5: the 8 real tokens (1,2,3,4,6,7,8,9) give runs of 2
    mask = torch.ones(1, 10, dtype=torch.bool)
    mask[0, 0] = mask[0, 5] = False
    means, valid = segment_means(x, mask, 4)
    assert means.flatten().tolist() == [1.5, 3.5, 6.5, 8.5]
    # fewer real tokens than segments: each its own, the rest empty
    means, valid = segment_means(x[:, :2], None, 4)
    assert valid.flatten().tolist() == [True, False, True, False]
    assert means.flatten().tolist() == [0.0, 0.0, 1.0, 0.0]
    p = segment_matrix(mask, 1, 10, 4, None, torch.float32)  # the reference's averaging matrix agrees
    assert torch.allclose(torch.einsum("bst,bthd->bshd", p, x), segment_means(x, mask, 4)[0])


def test_iterative_pinv_converges_to_the_pseudo_inverse():
    a = torch.softmax(torch.randn(3, 6, 6, dtype=torch.float64), -1) + torch.eye(6, dtype=torch.float64)
    assert torch.allclose(iterative_pinv(a, 40), torch.linalg.pinv(a), atol=1e-9)
    # zero rows and columns (empty landmarks) stay zero: the pinv of the non-empty block
    b = torch.zeros(7, 7, dtype=torch.float64)
    b[:6, :6] = a[0]
    z = iterative_pinv(b, 40)
    assert z[6].abs().max() == 0 and z[:, 6].abs().max() == 0
    assert torch.allclose(z[:6, :6], torch.linalg.inv(a[0]), atol=1e-9)


def test_pinv_normaliser_is_per_matrix():
    # one batch row's scale must not change another's result (the paper's code takes a global max)
    a = torch.softmax(torch.randn(2, 5, 5, dtype=torch.float64), -1)
    both = iterative_pinv(torch.stack([a[0], a[1] * 100]), 6)
    assert torch.allclose(both[0], iterative_pinv(a[:1], 6)[0])


@pytest.mark.parametrize("path", ["reference", "sdpa"])
def test_one_landmark_per_token_is_softmax_attention(path):
    # m = T: Q~ = Q, K~ = K, so F = A = B = softmax(QK^T) and F A^+ B = A: exact attention (A invertible)
    q, k, v = make_qkv(2, 6, 6, 2, 2, 8, dtype=torch.float64)
    mech = attnkit.create("nystrom", num_landmarks=6, pinv_iterations=60)
    assert_close("m = T", softmax_attention(q, k, v), mech(q, k, v, pattern="noncausal_self", path=path), 1e-7)


@pytest.mark.parametrize("path", ["reference", "sdpa"])
def test_padding_in_the_middle_is_as_if_removed(path):
    q, k, v = make_qkv(2, 30, 30, 2, 2, 8)
    mask = torch.ones(2, 30, dtype=torch.bool)
    mask[:, 7:11] = False
    mech = attnkit.create("nystrom", num_landmarks=5)
    out = mech(q, k, v, pattern="noncausal_self", key_padding_mask=mask, path=path)
    keep = mask[0]
    want = mech(q[:, keep], k[:, keep], v[:, keep], pattern="noncausal_self", path=path)
    assert_close("padded", want, out[:, keep], 2e-5)


def test_causal_patterns_raise():
    q, k, v = make_qkv(1, 8, 8, 2, 2, 8)
    for pattern in ("causal_self", "causal_cross"):
        with pytest.raises(UnsupportedPattern, match="nystrom"):
            attnkit.attend(q, k, v, "nystrom", pattern=pattern)


@pytest.mark.parametrize(
    ("option", "value"),
    [("num_landmarks", 0), ("num_landmarks", 2**70), ("num_landmarks", -3), ("num_landmarks", "8"),
     ("pinv_iterations", -1), ("pinv_iterations", 10**6), ("pinv_iterations", 2.5)],
)  # fmt: skip
def test_options_are_checked(option, value):
    with pytest.raises(InvalidOption, match=option):
        attnkit.create("nystrom", **{option: value})


def test_fast_path_never_makes_a_quadratic_tensor():
    t, m = 1024, 16
    q, k, v = make_qkv(1, t, t, 2, 2, 16)
    mech = attnkit.create("nystrom", num_landmarks=m)
    numel, shape = largest_tensor(lambda: mech(q, k, v, pattern="noncausal_self", path="sdpa"))
    assert numel <= t * 2 * 16, shape  # at most q's size: no [T, T], not even [T, m] per head kept
    numel, _ = largest_tensor(lambda: mech(q, k, v, pattern="noncausal_self", path="reference"))
    assert numel >= t * t  # the reference does write the T x T weights out
