"""dynamic_mask: content scores, top-keep by a loop, keep >= T is biased softmax, no leak, no [T, T]."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from topk_helpers import future_changes_nothing, largest_call_tensor, softmax_over

import attnkit
from attnkit.errors import InvalidOption, ShapeError
from attnkit.testing import assert_close, make_qkv

PATHS = ("reference", "blocked")


def content_scores(mech, v):
    w, a = mech.score_weight.detach().double(), mech.score_gain.detach().double()
    return torch.exp(a[:, None] * F.softplus(torch.einsum("bthd,hd->bht", v.double(), w)))  # [B, H, T]


def keep_loop(z, t, keep, causal):
    b, h, _ = z.shape
    allowed = torch.zeros(b, h, t, t, dtype=torch.bool)
    for bi in range(b):
        for hi in range(h):
            for i in range(t):
                cands = range(i + 1) if causal else range(t)
                top = sorted(cands, key=lambda j: (z[bi, hi, j].item(), j), reverse=True)[:keep]
                allowed[bi, hi, i, top] = True
    return allowed


def build(**options):
    torch.manual_seed(0)
    return attnkit.create("dynamic_mask", heads=2, head_dim=8, **options)


@pytest.mark.parametrize("pattern", ["causal_self", "noncausal_self"])
@pytest.mark.parametrize("path", PATHS)
def test_selection_matches_a_loop(pattern, path):
    q, k, v = make_qkv(2, 23, 23, 2, 2, 8, dtype=torch.float64)
    mech = build(keep=5, block_size=4)
    z = content_scores(mech, v)
    expected = softmax_over(q, k, v, keep_loop(z, 23, 5, pattern == "causal_self"), z[:, :, None, :])
    assert_close(path, expected, mech(q, k, v, pattern=pattern, path=path), 1e-9)


def test_ties_go_to_the_latest_keys():
    """With A = 0 every z is 1: causal selection is then the last `keep` keys (a sliding window)."""
    q, k, v = make_qkv(1, 20, 20, 2, 2, 8, dtype=torch.float64)
    mech = build(keep=3, block_size=4)
    with torch.no_grad():
        mech.score_gain.zero_()
    window = attnkit.create("sliding_window", window=3)(q, k, v, pattern="causal_self")
    for path in PATHS:
        assert_close(path, window, mech(q, k, v, pattern="causal_self", path=path), 1e-9)


@pytest.mark.parametrize("block_size", [1, 3, 64])
def test_block_size_changes_nothing(block_size):
    q, k, v = make_qkv(1, 30, 30, 2, 2, 8, dtype=torch.float64)
    ref = build(keep=6)(q, k, v, pattern="causal_self", path="reference")
    assert_close("blocked", ref, build(keep=6, block_size=block_size)(q, k, v, pattern="causal_self"), 1e-9)


def test_content_scores_get_gradients():
    q, k, v = make_qkv(1, 16, 16, 2, 2, 8)
    mech = build(keep=4, block_size=4)
    for path in PATHS:
        mech.zero_grad()
        mech(q, k, v, pattern="causal_self", path=path).square().sum().backward()
        assert mech.score_weight.grad.abs().sum() > 0 and mech.score_gain.grad.abs().sum() > 0


@pytest.mark.parametrize("path", PATHS)
def test_no_causal_leak(path):
    future_changes_nothing(build(keep=4, block_size=8), path)


@pytest.mark.parametrize("pattern", ["causal_self", "noncausal_self"])
def test_blocked_path_never_builds_t_by_t(pattern):
    t = 512
    q, k, v = make_qkv(1, t, t, 2, 2, 8)
    assert largest_call_tensor(build(keep=16, block_size=32), q, k, v, pattern, "blocked") < t * t // 2


def test_value_head_dim_must_match():
    q, k, v = make_qkv(1, 8, 8, 2, 2, 8, 4)
    with pytest.raises(ShapeError, match="head_dim"):
        build()(q, k, v, pattern="causal_self")


@pytest.mark.parametrize("bad", [0, -1, 2**70, 1.5, "4", True])
@pytest.mark.parametrize("name", ["keep", "block_size"])
def test_options_are_validated(name, bad):
    with pytest.raises(InvalidOption, match=name):
        build(**{name: bad})
