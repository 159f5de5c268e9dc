"""axial: the mean of per-axis attentions, causal on every axis (raster order), decoding by whole slices."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from largest_tensor import largest_tensor

import attnkit
from attnkit.errors import InvalidOption, ShapeError
from attnkit.testing import assert_close, make_qkv


def per_query_loop(q, k, v, shape, causal, kpm=None):
    """fp64, one query and one axis at a time: softmax over the real keys of the query's line along the axis
    (causal: at or before the query on it), averaged over the axes (an axis seeing nothing adds 0)."""
    b, t, hq, d = q.shape
    groups = hq // k.shape[2]
    k, v = k.repeat_interleave(groups, 2).double(), v.repeat_interleave(groups, 2).double()
    kpm = torch.ones(b, t, dtype=torch.bool) if kpm is None else kpm
    coords = list(itertools.product(*(range(s) for s in shape)))
    out = torch.zeros(b, t, hq, v.shape[-1], dtype=torch.float64)
    for i, c in enumerate(coords):
        for axis in range(len(shape)):
            line = [
                j
                for j, kc in enumerate(coords)
                if all(kc[a] == c[a] for a in range(len(shape)) if a != axis) and (not causal or kc[axis] <= c[axis])
            ]
            for bi in range(b):
                keys = [j for j in line if kpm[bi, j]]
                if not keys:
                    continue
                s = torch.einsum("hd,khd->hk", q[bi, i].double(), k[bi, keys]) / math.sqrt(d)
                out[bi, i] += torch.einsum("hk,khd->hd", s.softmax(-1), v[bi, keys]) / len(shape)
    return out


@pytest.mark.parametrize("pattern", ["noncausal_self", "causal_self"])
@pytest.mark.parametrize("shape", [(4, 5), (3, 1), (2, 3, 4)])
def test_reference_and_path_follow_the_axial_rule(pattern, shape):
    t = math.prod(shape)
    q, k, v = make_qkv(2, t, t, 4, 2, 8, dtype=torch.float64)
    kpm = torch.rand(2, t, generator=torch.Generator().manual_seed(1)) > 0.3
    for mask in (None, kpm):
        expected = per_query_loop(q, k, v, shape, pattern == "causal_self", mask)
        for path in ("reference", "per_axis"):
            out = attnkit.attend(
                q, k, v, "axial", pattern=pattern, spatial_shape=shape, key_padding_mask=mask, path=path
            )
            assert_close(f"{path} mask={mask is not None}", expected, out, 1e-10)


def test_a_single_row_is_the_mean_of_softmax_and_the_token_itself():
    """On a (1, n) grid the row is the whole sequence and each column holds only the query's own token."""
    q, k, v = make_qkv(2, 11, 11, 4, 4, 16)
    soft = attnkit.attend(q, k, v, pattern="noncausal_self")
    for path in ("reference", "per_axis"):
        out = attnkit.attend(q, k, v, "axial", pattern="noncausal_self", spatial_shape=(1, 11), path=path)
        assert_close(path, (soft + v) / 2, out, 1e-5)


@pytest.mark.parametrize("path", ["reference", "per_axis"])
def test_causal_is_raster_order(path):
    """A query's output depends on no key after it in raster order (not only on no later row)."""
    shape, t = (4, 5), 20
    q, k, v = make_qkv(1, t, t, 2, 2, 8)
    full = attnkit.attend(q, k, v, "axial", pattern="causal_self", spatial_shape=shape, path=path)
    for i in (0, 6, 13):
        k2, v2 = k.clone(), v.clone()
        k2[:, i + 1 :] += torch.randn_like(k2[:, i + 1 :])
        v2[:, i + 1 :] += torch.randn_like(v2[:, i + 1 :])
        moved = attnkit.attend(q, k2, v2, "axial", pattern="causal_self", spatial_shape=shape, path=path)
        assert_close(f"first {i + 1}", full[:, : i + 1], moved[:, : i + 1], 1e-6)
        assert (full[:, i + 1 :] - moved[:, i + 1 :]).abs().max() > 1e-3  # later queries do see the change


def test_decoding_needs_the_same_slices():
    q, k, v = make_qkv(1, 17, 17, 2, 2, 8)
    _, state = attnkit.attend(
        q[:, :12], k[:, :12], v[:, :12], "axial", pattern="causal_self", spatial_shape=(2, 6), return_state=True
    )
    with pytest.raises(ShapeError, match="whole slices of 5 tokens"):
        attnkit.attend(
            q[:, 12:], k[:, 12:], v[:, 12:], "axial", pattern="causal_self", spatial_shape=(1, 5), state=state
        )


@pytest.mark.parametrize("shape", [(12,), (1, 2, 2, 3)])
def test_grids_other_than_2d_and_3d_are_refused(shape):
    q, k, v = make_qkv(1, 12, 12, 2, 2, 8)
    with pytest.raises(ShapeError, match=r"\(2, 3\)"):
        attnkit.attend(q, k, v, "axial", pattern="noncausal_self", spatial_shape=shape)


def test_axial_has_no_options():
    with pytest.raises(InvalidOption, match="'window'"):
        attnkit.create("axial", window=3)


@pytest.mark.parametrize("pattern", ["noncausal_self", "causal_self"])
def test_the_per_axis_path_never_builds_a_t_by_t_tensor(pattern):
    t = 32 * 32
    q, k, v = make_qkv(1, t, t, 2, 2, 8)
    kpm = torch.rand(1, t) > 0.1
    mech = attnkit.create("axial")
    fast, shape = largest_tensor(
        lambda: mech(q, k, v, pattern=pattern, spatial_shape=(32, 32), key_padding_mask=kpm, path="per_axis")
    )
    ref, _ = largest_tensor(lambda: mech(q, k, v, pattern=pattern, spatial_shape=(32, 32), path="reference"))
    assert ref >= t * t  # the check can see a T x T tensor
    assert fast <= t * 64, f"largest tensor {shape}"


def test_flops_count_each_axis_of_the_calls_grid():
    from attnkit.mechanism import Shape
    from attnkit.patterns import Pattern

    mech = attnkit.create("axial")
    square = Shape(1, 4096, 4096, 2, 2, 16, 16)  # no grid: 64 x 64 is assumed, a row and a column
    assert mech.flops(square, Pattern.NONCAUSAL_SELF) == 2.0 * 2 * 4096 * 128 * 32
    volume = Shape(1, 4096, 4096, 2, 2, 16, 16, grid=(4, 32, 32))
    assert mech.flops(volume, Pattern.NONCAUSAL_SELF) == 2.0 * 2 * 4096 * 68 * 32
