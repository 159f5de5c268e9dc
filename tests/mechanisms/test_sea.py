"""sea: the linear estimate picks blocks (checked by a loop), all blocks give softmax, no leak, no [T, T]."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from topk_helpers import future_changes_nothing, largest_call_tensor, softmax_over

import attnkit
from attnkit.errors import InvalidOption
from attnkit.testing import assert_close, make_qkv

PATHS = ("reference", "routed")


def causal_loop(q, k, v, topk, bs):
    """Per query: estimate each block's mass from its keys <= i, keep the top-k blocks, softmax over them."""
    b, t, h, d = q.shape
    phi = lambda x: F.elu(x.double() / d**0.25) + 1  # noqa: E731 - sqrt(scale) x
    allowed = torch.zeros(b, h, t, t, dtype=torch.bool)
    for bi in range(b):
        for hi in range(h):
            for i in range(t):
                est = []
                for c in range(i // bs + 1):
                    keys = range(c * bs, min((c + 1) * bs, i + 1))
                    est.append(sum(phi(q[bi, i, hi]) @ phi(k[bi, j, hi]) for j in keys))
                top = sorted(range(len(est)), key=lambda c: (est[c], c), reverse=True)[:topk]
                for c in top:
                    allowed[bi, hi, i, c * bs : min((c + 1) * bs, i + 1)] = True
    return softmax_over(q, k, v, allowed)


@pytest.mark.parametrize("path", PATHS)
def test_causal_selection_matches_a_loop(path):
    q, k, v = make_qkv(1, 19, 19, 2, 2, 8, dtype=torch.float64)
    mech = attnkit.create("sea", topk=2, block_size=4)
    assert_close(path, causal_loop(q, k, v, 2, 4), mech(q, k, v, pattern="causal_self", path=path), 1e-9)


@pytest.mark.parametrize("pattern", ["causal_self", "noncausal_self"])
@pytest.mark.parametrize("path", PATHS)
def test_every_block_selected_is_softmax(pattern, path):
    q, k, v = make_qkv(2, 37, 37, 4, 2, 16, dtype=torch.float64)
    mech = attnkit.create("sea", topk=10, block_size=4)
    expected = attnkit.create("softmax")(q, k, v, pattern=pattern)
    assert_close(path, expected, mech(q, k, v, pattern=pattern, path=path), 1e-9)


def test_noncausal_query_blocks_share_their_blocks():
    """With one block kept, each query block attends to exactly one key block (softmax within it)."""
    q, k, v = make_qkv(1, 16, 16, 1, 1, 8, dtype=torch.float64)
    mech = attnkit.create("sea", topk=1, block_size=4)
    out = mech(q, k, v, pattern="noncausal_self", path="routed")
    for start in range(0, 16, 4):
        matches = [
            torch.allclose(
                out[:, start : start + 4], softmax_over(q, k, v, _block_mask(start, c))[:, start : start + 4]
            )
            for c in range(4)
        ]
        assert sum(matches) == 1


def _block_mask(qstart, c):
    m = torch.zeros(1, 1, 16, 16, dtype=torch.bool)
    m[..., qstart : qstart + 4, c * 4 : c * 4 + 4] = True
    return m


@pytest.mark.parametrize("path", PATHS)
def test_no_causal_leak(path):
    future_changes_nothing(attnkit.create("sea", topk=2, block_size=4), path)


@pytest.mark.parametrize("pattern", ["causal_self", "noncausal_self"])
def test_routed_path_never_builds_t_by_t(pattern):
    t = 512
    q, k, v = make_qkv(1, t, t, 1, 1, 16)
    mech = attnkit.create("sea", topk=2, block_size=32)
    assert largest_call_tensor(mech, q, k, v, pattern, "routed") < t * t // 2
    assert largest_call_tensor(mech, q, k, v, pattern, "reference") >= t * t  # the reference is dense


@pytest.mark.parametrize("bad", [0, -1, 2**70, 1.5, "4", True])
@pytest.mark.parametrize("name", ["topk", "block_size"])
def test_options_are_validated(name, bad):
    with pytest.raises(InvalidOption, match=name):
        attnkit.create("sea", **{name: bad})
