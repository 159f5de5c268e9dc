"""strip: the union of a query's row strip and column strip, checked against a literal per-query loop, borders of
non-dividing grids, padding, refusals and the fast path's memory."""

from __future__ import annotations

import math

import pytest
import torch
from largest_tensor import largest_tensor

import attnkit
from attnkit.errors import InvalidOption, ShapeError, UnsupportedPattern
from attnkit.testing import assert_close, make_qkv

PATHS = ("reference", "strips")


def literal(q, k, v, shape, strip, real=None):
    """Per query (r, c) and head: softmax over the real keys (r', c') with r' // s == r // s or c' // s == c // s,
    each key once; fp64, k and v repeated to the query heads; a query that sees no key outputs 0."""
    b, t, hq, d = q.shape
    g = hq // k.shape[2]
    q, k, v = q.double(), k.double().repeat_interleave(g, 2), v.double().repeat_interleave(g, 2)
    real = torch.ones(b, t, dtype=torch.bool) if real is None else real
    h, w = shape
    out = torch.zeros(b, t, hq, v.shape[-1], dtype=torch.float64)
    for bi in range(b):
        for r in range(h):
            for c in range(w):
                keys = [
                    r2 * w + c2
                    for r2 in range(h)
                    for c2 in range(w)
                    if (r2 // strip == r // strip or c2 // strip == c // strip) and real[bi, r2 * w + c2]
                ]
                if not keys:
                    continue
                i = r * w + c
                for head in range(hq):
                    s = torch.stack([q[bi, i, head] @ k[bi, j, head] for j in keys]) / math.sqrt(d)
                    out[bi, i, head] = s.softmax(0) @ v[bi, keys, head]
    return out


@pytest.mark.parametrize("shape, strip, heads, kv_heads", [((5, 7), 2, 4, 2), ((4, 6), 3, 3, 1), ((3, 8), 1, 2, 2)])
def test_paths_follow_the_literal_loop(shape, strip, heads, kv_heads):
    """Non-dividing grids (5 rows and 7 columns in strips of 2, 4 rows in strips of 3), GQA, key padding."""
    t = shape[0] * shape[1]
    q, k, v = make_qkv(2, t, t, heads, kv_heads, 4, dtype=torch.float64)
    real = torch.rand(2, t, generator=torch.Generator().manual_seed(3)) > 0.4
    real[1, :] = False
    real[1, 0] = True  # batch row 1: one real key, so most queries' crosses hold none and output 0
    mech = attnkit.create("strip", strip=strip)
    for mask in (None, real):
        expected = literal(q, k, v, shape, strip, mask)
        for path in PATHS:
            out = mech(q, k, v, pattern="noncausal_self", spatial_shape=shape, key_padding_mask=mask, path=path)
            assert_close(f"{path} mask={mask is not None}", expected, out, 1e-10)


@pytest.mark.parametrize("path", PATHS)
def test_strips_covering_the_grid_are_softmax(path):
    q, k, v = make_qkv(2, 35, 35, 4, 2, 8)
    soft = attnkit.attend(q, k, v, pattern="noncausal_self")
    for strip in (5, 7, 9):  # a row strip of 5 rows already covers a 5 x 7 grid
        out = attnkit.attend(q, k, v, "strip", pattern="noncausal_self", spatial_shape=(5, 7), strip=strip, path=path)
        assert_close(f"{path} strip={strip}", soft, out, 1e-5)


@pytest.mark.parametrize("path", PATHS)
def test_border_query_of_a_non_dividing_grid_sees_its_thinner_strips(path):
    """5 x 7 grid in strips of 2: query (4, 6) has row strip {row 4} and column strip {column 6}; the literal key
    set (11 keys, (4, 6) once) attended with plain softmax."""
    h, w = 5, 7
    q, k, v = make_qkv(1, h * w, h * w, 2, 2, 8)
    out = attnkit.attend(q, k, v, "strip", pattern="noncausal_self", spatial_shape=(h, w), strip=2, path=path)
    keys = sorted({4 * w + c for c in range(w)} | {r * w + 6 for r in range(h)})
    assert len(keys) == 11
    i = 4 * w + 6
    expected = attnkit.attend(q[:, [i]], k[:, keys], v[:, keys], pattern="noncausal_cross")
    assert_close("border", expected[:, 0], out[:, i], 1e-5)


def test_every_head_sees_the_whole_cross_unlike_cswin():
    """strip=1: moving a key in the query's column changes every head of that query, moving one outside its
    row and column changes none."""
    h, w = 4, 5
    q, k, v = make_qkv(1, h * w, h * w, 3, 3, 8)
    mech = attnkit.create("strip", strip=1)
    out = mech(q, k, v, pattern="noncausal_self", spatial_shape=(h, w))
    i = 1 * w + 2  # query (1, 2)
    in_column, outside = 3 * w + 2, 3 * w + 4
    for j, changes in ((in_column, True), (outside, False)):
        k2 = k.clone()
        k2[:, j] += 3 * torch.randn_like(k2[:, j])
        moved = mech(q, k2, v, pattern="noncausal_self", spatial_shape=(h, w))
        diff = (out[:, i] - moved[:, i]).abs().amax(-1)  # [1, H]
        assert bool((diff > 1e-4).all()) if changes else torch.equal(out[:, i], moved[:, i])


def test_nan_in_padded_keys_never_leaks():
    h, w = 5, 6
    q, k, v = make_qkv(1, h * w, h * w, 2, 2, 4)
    real = torch.ones(1, h * w, dtype=torch.bool)
    real[0, [3, 17, 29]] = False
    clean = attnkit.attend(q, k, v, "strip", pattern="noncausal_self", spatial_shape=(h, w), strip=2,
                           key_padding_mask=real, path="strips")  # fmt: skip
    k2, v2 = k.clone(), v.clone()
    k2[:, ~real[0]] = float("nan")
    v2[:, ~real[0]] = float("inf")
    dirty = attnkit.attend(q, k2, v2, "strip", pattern="noncausal_self", spatial_shape=(h, w), strip=2,
                           key_padding_mask=real, path="strips")  # fmt: skip
    assert torch.equal(clean, dirty)


def test_refusals():
    q, k, v = make_qkv(1, 12, 12, 2, 2, 4)
    mech = attnkit.create("strip", strip=2)
    for shape in ((12,), (2, 2, 3)):
        with pytest.raises(ShapeError, match=r"2-D spatial_shape \(h, w\); got spatial_shape"):
            mech(q, k, v, pattern="noncausal_self", spatial_shape=shape)
    with pytest.raises(ShapeError):
        mech(q, k, v, pattern="noncausal_self", spatial_shape=(3, 5))
    with pytest.raises(UnsupportedPattern, match="supports: noncausal_self"):
        mech(q, k, v, pattern="noncausal_cross", spatial_shape=(3, 4))
    for bad in ({"strip": 0}, {"strip": -1}, {"strip": 2.0}, {"strip": True}, {"strips": 2}):
        with pytest.raises(InvalidOption, match=next(iter(bad))):
            attnkit.create("strip", **bad)


def test_fast_path_never_builds_a_token_by_token_tensor():
    h = w = 32
    t = h * w
    q, k, v = make_qkv(1, t, t, 2, 2, 8)
    mech = attnkit.create("strip", strip=3)  # 32 rows and columns: the last strips are padded
    numel, shape = largest_tensor(lambda: mech(q, k, v, pattern="noncausal_self", spatial_shape=(h, w), path="strips"))
    padded = 33
    assert numel <= 2 * padded * padded * 3 * padded, shape  # the strips' scores: H * T' * (s * w') at most
    assert numel < t * t // 4
