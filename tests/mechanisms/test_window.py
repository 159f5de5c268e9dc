"""window: Swin's windows (shifted, with Swin's region mask), HaloNet's halo, borders of grids that do not divide."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from largest_tensor import largest_tensor

import attnkit
from attnkit.errors import InvalidOption, ShapeError
from attnkit.testing import assert_close, make_qkv


def _attend_rows(q, k, v, i, keys):
    """fp64 softmax attention of token ``i`` over the token indices ``keys``: ``[B, H, Dv]``."""
    keys = torch.tensor(keys)
    s = torch.einsum("bhd,bkhd->bhk", q[:, i].double(), k[:, keys].double()) / math.sqrt(q.shape[-1])
    return torch.einsum("bhk,bkhd->bhd", s.softmax(-1), v[:, keys].double())


def swin_literal(q, k, v, shape, window, shift):
    """Swin's own recipe on a 2-D grid, one query at a time: pad to whole windows, roll by -shift, label the
    regions with Swin's slices (img_mask), and let a query see the real tokens of its window and region."""
    (h, w), (wh, ww), (sh, sw) = shape, window, shift
    ph, pw = -(-h // wh) * wh, -(-w // ww) * ww
    img_mask = torch.zeros(ph, pw, dtype=torch.long)  # as in Swin's BasicLayer, on the padded grid
    cnt = 0
    for hs in (slice(0, -wh), slice(-wh, -sh), slice(-sh, None)) if sh else (slice(None),):
        for ws in (slice(0, -ww), slice(-ww, -sw), slice(-sw, None)) if sw else (slice(None),):
            img_mask[hs, ws] = cnt
            cnt += 1
    out = torch.zeros(q.shape[0], h * w, q.shape[2], v.shape[-1], dtype=torch.float64)
    for r, c in itertools.product(range(h), range(w)):
        rr, rc = (r - sh) % ph, (c - sw) % pw  # the query's place on the rolled grid
        keys = []
        for kr, kc in itertools.product(range(h), range(w)):
            kr2, kc2 = (kr - sh) % ph, (kc - sw) % pw
            if (kr2 // wh, kc2 // ww) == (rr // wh, rc // ww) and img_mask[kr2, kc2] == img_mask[rr, rc]:
                keys.append(kr * w + kc)
        out[:, r * w + c] = _attend_rows(q, k, v, r * w + c, keys)
    return out


def halo_literal(q, k, v, shape, block, halo):
    """HaloNet, one query at a time: its block widened by ``halo`` on every axis, cut at the grid's borders."""
    out = torch.zeros(q.shape[0], math.prod(shape), q.shape[2], v.shape[-1], dtype=torch.float64)
    coords = list(itertools.product(*(range(s) for s in shape)))
    for i, c in enumerate(coords):
        lo = [x // block * block - halo for x in c]
        span = block + 2 * halo
        keys = [j for j, kc in enumerate(coords) if all(a <= y < a + span for a, y in zip(lo, kc, strict=True))]
        out[:, i] = _attend_rows(q, k, v, i, keys)
    return out


@pytest.mark.parametrize(
    "shape,window,shift",
    [
        ((6, 9), (3, 3), (0, 0)),  # whole windows: the path runs without a mask
        ((7, 9), (3, 3), (0, 0)),
        ((7, 9), (3, 3), (1, 1)),
        ((8, 10), (4, 4), (2, 2)),
        ((6, 11), (2, 4), (1, 3)),
    ],
)
def test_swin_windows_follow_swins_recipe(shape, window, shift):
    q, k, v = make_qkv(2, math.prod(shape), math.prod(shape), 2, 2, 8, dtype=torch.float64)
    expected = swin_literal(q, k, v, shape, window, shift)
    opts = {"window_size": window} if not any(shift) else {"window_size": window, "shift": True, "shift_size": shift}
    for path in ("reference", "windowed"):
        out = attnkit.attend(q, k, v, "window", pattern="noncausal_self", spatial_shape=shape, path=path, **opts)
        assert_close(path, expected, out, 1e-10)


@pytest.mark.parametrize("shape,block,halo", [((7, 9), 3, 1), ((5, 6), 2, 2), ((3, 4, 5), 2, 1), ((11,), 4, 3)])
def test_halo_blocks_follow_halonet(shape, block, halo):
    q, k, v = make_qkv(2, math.prod(shape), math.prod(shape), 2, 1, 8, dtype=torch.float64)
    expected = halo_literal(q, k, v, shape, block, halo)
    for path in ("reference", "windowed"):
        out = attnkit.attend(
            q, k, v, "window", pattern="noncausal_self", spatial_shape=shape, path=path, window_size=block, halo=halo
        )
        assert_close(path, expected, out, 1e-10)


@pytest.mark.parametrize(
    "shape,opts",
    [
        ((5, 6), {"window_size": 6}),
        ((5, 6), {"window_size": 7, "shift": True}),  # Swin: an axis the window covers is not shifted
        ((2, 3, 4), {"window_size": (2, 3, 4)}),
        ((13,), {"window_size": 2, "halo": 12}),
    ],
)
def test_a_window_covering_the_grid_is_softmax(shape, opts):
    t = math.prod(shape)
    q, k, v = make_qkv(2, t, t, 4, 2, 16)
    soft = attnkit.attend(q, k, v, pattern="noncausal_self")
    for path in ("reference", "windowed"):
        out = attnkit.attend(q, k, v, "window", pattern="noncausal_self", spatial_shape=shape, path=path, **opts)
        assert_close(path, soft, out, 1e-5)


def test_the_last_window_of_a_grid_that_does_not_divide_holds_only_real_tokens():
    """(7, 9) in windows of 4: the corner query (6, 8) sees rows 4..6 of column 8, three real keys."""
    shape = (7, 9)
    q, k, v = make_qkv(1, 63, 63, 2, 2, 8, dtype=torch.float64)
    expected = _attend_rows(q, k, v, 6 * 9 + 8, [4 * 9 + 8, 5 * 9 + 8, 6 * 9 + 8])
    for path in ("reference", "windowed"):
        out = attnkit.attend(q, k, v, "window", pattern="noncausal_self", spatial_shape=shape, path=path, window_size=4)
        assert_close(path, expected, out[:, 6 * 9 + 8], 1e-10)


def test_tokens_wrapped_by_the_shift_see_only_their_own_region():
    """(8, 8), window 4, shift 2: the window holding token (0, 0) after the roll spans rows and columns
    6, 7, 0, 1; Swin's mask keeps (0, 0) to the four tokens of rows and columns 0, 1."""
    q, k, v = make_qkv(1, 64, 64, 2, 2, 8, dtype=torch.float64)
    expected = _attend_rows(q, k, v, 0, [0, 1, 8, 9])
    for path in ("reference", "windowed"):
        out = attnkit.attend(
            q, k, v, "window", pattern="noncausal_self", spatial_shape=(8, 8), path=path, window_size=4, shift=True
        )
        assert_close(path, expected, out[:, 0], 1e-10)


@pytest.mark.parametrize(
    "opts,words",
    [
        ({"window_size": 0}, ["window_size=0", ">= 1"]),
        ({"window_size": "7"}, ["window_size='7'", "integer"]),
        ({"window_size": (3, 0)}, ["window_size=0"]),
        ({"window_size": (1, 2, 3, 4)}, ["1 to 3 sizes"]),
        ({"window_size": 4, "shift_size": 2}, ["shift_size=2", "shift=True"]),
        ({"window_size": 4, "shift": True, "halo": 1}, ["shift=True", "halo=1"]),
        ({"halo": -1}, ["halo=-1", ">= 0"]),
        ({"window_size": 4, "shift": True, "shift_size": 4}, ["shift_size=4", "smaller than window_size=4"]),
        ({"window_size": (4, 2), "shift": True, "shift_size": 2}, ["shift_size=2", "window_size=(4, 2)"]),
        ({"shift": 1}, ["shift=1", "True or False"]),
        ({"windows": 4}, ["'windows'", "window_size"]),
    ],
)
def test_bad_options_are_refused(opts, words):
    with pytest.raises(InvalidOption) as err:
        attnkit.create("window", **opts)
    assert all(w in str(err.value) for w in words), str(err.value)


def test_bad_grids_are_refused_before_compute():
    q, k, v = make_qkv(1, 24, 24, 2, 2, 8)
    mech = attnkit.create("window", window_size=(2, 2))
    with pytest.raises(ShapeError, match=r"window_size=\(2, 2\) has 2 sizes .* 3 axes"):
        mech(q, k, v, pattern="noncausal_self", spatial_shape=(2, 3, 4))
    with pytest.raises(ShapeError, match=r"\(1, 2, 3\)"):
        attnkit.create("window")(q, k, v, pattern="noncausal_self", spatial_shape=(1, 2, 3, 4))
    with pytest.raises(ShapeError, match=r"shift_size=\(1, 1\) has 2 sizes .* 3 axes"):
        attnkit.create("window", window_size=3, shift=True, shift_size=(1, 1))(
            q, k, v, pattern="noncausal_self", spatial_shape=(2, 3, 4)
        )


def test_the_windowed_path_never_builds_a_t_by_t_tensor():
    t = 32 * 32
    q, k, v = make_qkv(1, t, t, 2, 2, 8)
    for opts in ({"window_size": 4, "shift": True}, {"window_size": 4, "halo": 2}):
        mech = attnkit.create("window", **opts)
        fast, shape = largest_tensor(
            lambda: mech(q, k, v, pattern="noncausal_self", spatial_shape=(32, 32), path="windowed")  # noqa: B023
        )
        ref, _ = largest_tensor(
            lambda: mech(q, k, v, pattern="noncausal_self", spatial_shape=(32, 32), path="reference")  # noqa: B023
        )
        assert ref >= t * t  # the check can see a T x T tensor
        assert fast <= t * 64, f"{opts}: largest tensor {shape}"
