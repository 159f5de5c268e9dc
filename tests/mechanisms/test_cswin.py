"""cswin: cross-shaped stripes checked against a literal per-query loop, borders of non-dividing grids, LePE."""

from __future__ import annotations

import math

import pytest
import torch
from largest_tensor import largest_tensor

import attnkit
from attnkit.errors import AttnkitError, InvalidOption, ShapeError, UnsupportedPattern
from attnkit.testing import assert_close, make_qkv


def literal(q, k, v, shape, stripe, weight=None, bias=None, real=None):
    """Per query (r, c) and head: softmax over the keys of its stripe (rows for the first ceil(H/2) heads,
    columns for the rest), plus LePE summed tap by tap inside the grid and the stripe; fp64, k, v repeated."""
    b, t, hq, d = q.shape
    g = hq // k.shape[2]
    q, k, v = q.double(), k.double().repeat_interleave(g, 2), v.double().repeat_interleave(g, 2)
    real = torch.ones(b, t, dtype=torch.bool) if real is None else real
    h, w = shape
    out = torch.zeros(b, t, hq, v.shape[-1], dtype=torch.float64)
    for bi in range(b):
        for head in range(hq):
            horizontal = head < (hq + 1) // 2
            for r in range(h):
                for c in range(w):

                    def same(r2, c2, r=r, c=c, horizontal=horizontal):
                        return r2 // stripe == r // stripe if horizontal else c2 // stripe == c // stripe

                    keys = [r2 * w + c2 for r2 in range(h) for c2 in range(w) if same(r2, c2) and real[bi, r2 * w + c2]]
                    if not keys:
                        continue  # sees no real key: 0
                    i = r * w + c
                    s = torch.stack([q[bi, i, head] @ k[bi, j, head] for j in keys]) / math.sqrt(d)
                    out[bi, i, head] = s.softmax(0) @ v[bi, keys, head]
                    if weight is None:
                        continue
                    lepe = bias[head].double().clone()
                    for a in (-1, 0, 1):
                        for e in (-1, 0, 1):
                            r2, c2 = r + a, c + e
                            if 0 <= r2 < h and 0 <= c2 < w and same(r2, c2):
                                v2 = v[bi, r2 * w + c2, head] if real[bi, r2 * w + c2] else 0.0
                                lepe += weight[head, :, a + 1, e + 1].double() * v2
                    out[bi, i, head] += lepe
    return out


def build(heads, d, **options):
    torch.manual_seed(1)
    return attnkit.create("cswin", heads=heads, head_dim=d, **options).double()


@pytest.mark.parametrize("lepe", [False, True])
@pytest.mark.parametrize("shape, stripe, heads", [((5, 7), 2, 4), ((4, 6), 3, 3), ((3, 8), 1, 1), ((6, 4), 4, 2)])
def test_paths_follow_the_literal_loop(shape, stripe, heads, lepe):
    """Non-dividing grids (5 rows in bands of 2, 7 columns in bands of 2...), odd head counts and GQA."""
    t = shape[0] * shape[1]
    kv_heads = 1 if heads != 4 else 2
    q, k, v = make_qkv(2, t, t, heads, kv_heads, 4, dtype=torch.float64)
    real = torch.rand(2, t, generator=torch.Generator().manual_seed(3)) > 0.25
    mech = build(heads, 4, stripe=stripe, lepe=lepe)
    weight, bias = (mech.lepe_weight, mech.lepe_bias) if lepe else (None, None)
    for mask in (None, real):
        expected = literal(q, k, v, shape, stripe, weight, bias, mask)
        for path in ("reference", "sdpa"):
            out = mech(q, k, v, pattern="noncausal_self", spatial_shape=shape, key_padding_mask=mask, path=path)
            assert_close(f"{path} mask={mask is not None}", expected, out, 1e-10)


@pytest.mark.parametrize("path", ["reference", "sdpa"])
def test_stripes_covering_the_grid_are_softmax(path):
    q, k, v = make_qkv(2, 35, 35, 4, 2, 8)
    soft = attnkit.attend(q, k, v, pattern="noncausal_self")
    mech = attnkit.create("cswin", heads=4, head_dim=8, stripe=7, lepe=False)
    assert_close(path, soft, mech(q, k, v, pattern="noncausal_self", spatial_shape=(5, 7), path=path), 1e-5)


@pytest.mark.parametrize("path", ["reference", "sdpa"])
def test_last_band_of_a_non_dividing_grid_is_narrower(path):
    """On 5 rows in bands of 2, a horizontal head's query in row 4 sees only row 4: softmax over those 6 keys,
    and keys in rows 0-3 change nothing for it. A vertical head's query in column 5 (of 6, bands of 2: {4, 5})."""
    h, w = 5, 6
    q, k, v = make_qkv(1, h * w, h * w, 2, 2, 8)
    mech = attnkit.create("cswin", heads=2, head_dim=8, stripe=2, lepe=False)
    out = mech(q, k, v, pattern="noncausal_self", spatial_shape=(h, w), path=path)
    row4 = list(range(4 * w, 5 * w))
    i = 4 * w + 1
    expected = attnkit.attend(q[:, [i]], k[:, row4], v[:, row4], pattern="noncausal_cross")
    assert_close("horizontal", expected[:, 0, 0], out[:, i, 0], 1e-5)
    cols45 = [r * w + c for r in range(h) for c in (4, 5)]
    i = 2 * w + 5
    expected = attnkit.attend(q[:, [i]], k[:, cols45], v[:, cols45], pattern="noncausal_cross")
    assert_close("vertical", expected[:, 0, 1], out[:, i, 1], 1e-5)


def test_head_split_takes_the_first_half_rounded_up_horizontal():
    """Three heads: heads 0 and 1 attend along rows, head 2 along columns (moving another row's keys shows it)."""
    h, w = 4, 4
    q, k, v = make_qkv(1, h * w, h * w, 3, 3, 8)
    mech = attnkit.create("cswin", heads=3, head_dim=8, stripe=1, lepe=False)
    out = mech(q, k, v, pattern="noncausal_self", spatial_shape=(h, w))
    k2 = k.clone()
    k2[:, w:] += torch.randn_like(k2[:, w:])  # every row but row 0 moves
    moved = mech(q, k2, v, pattern="noncausal_self", spatial_shape=(h, w))
    assert torch.equal(out[:, :w, :2], moved[:, :w, :2])  # row 0's horizontal heads see row 0 only
    assert (out[:, :w, 2] - moved[:, :w, 2]).abs().max() > 1e-3  # its vertical head sees the column


def test_lepe_is_trained():
    q, k, v = make_qkv(1, 20, 20, 2, 2, 4, requires_grad=True)
    mech = attnkit.create("cswin", heads=2, head_dim=4, stripe=2)
    mech(q, k, v, pattern="noncausal_self", spatial_shape=(4, 5), path="sdpa").square().sum().backward()
    assert mech.lepe_weight.grad.abs().max() > 0 and mech.lepe_bias.grad.abs().max() > 0
    assert not list(attnkit.create("cswin", heads=2, head_dim=4, lepe=False).parameters())


def test_refusals():
    q, k, v = make_qkv(1, 12, 12, 2, 2, 4)
    mech = attnkit.create("cswin", heads=2, head_dim=4, stripe=2)
    for shape in ((12,), (2, 2, 3)):
        with pytest.raises(ShapeError, match=r"2-D spatial_shape \(h, w\); got spatial_shape"):
            mech(q, k, v, pattern="noncausal_self", spatial_shape=shape)
    with pytest.raises(ShapeError, match="head_dim=4 for LePE; v has Dv=2"):
        mech(q, k, v[..., :2], pattern="noncausal_self", spatial_shape=(3, 4))
    with pytest.raises(UnsupportedPattern, match="supports: noncausal_self"):
        mech(q, k, v, pattern="noncausal_cross", spatial_shape=(3, 4))
    with pytest.raises(AttnkitError, match="attnkit.create"):
        attnkit.attend(q, k, v, "cswin", pattern="noncausal_self", spatial_shape=(3, 4))
    for bad in ({"stripe": 0}, {"stripe": 2.0}, {"stripe": True}, {"lepe": "yes"}, {"stripes": 2}):
        with pytest.raises(InvalidOption, match=next(iter(bad))):
            attnkit.create("cswin", heads=2, head_dim=4, **bad)


def test_fast_path_never_builds_a_token_by_token_tensor():
    h = w = 32
    t = h * w
    q, k, v = make_qkv(1, t, t, 2, 2, 8)
    mech = attnkit.create("cswin", heads=2, head_dim=8, stripe=3)  # 32 rows: the last band is padded
    numel, shape = largest_tensor(lambda: mech(q, k, v, pattern="noncausal_self", spatial_shape=(h, w), path="sdpa"))
    band = 3 * w
    assert numel <= max(t * 2 * 8 * 2, 11 * band * band), shape  # one band's scores at most, never T x T
    assert numel < t * t // 4
