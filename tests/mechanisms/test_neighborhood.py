"""neighborhood: NATTEN's window rule checked query by query, its borders, limits, options and memory."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from largest_tensor import largest_tensor

import attnkit
from attnkit.errors import InvalidOption, ShapeError
from attnkit.inputs import validate
from attnkit.mechanism import Shape
from attnkit.patterns import Pattern, dense_mask
from attnkit.testing import assert_close, make_qkv

PATHS = ("reference", "tiled")


def natten_window_start(i: int, length: int, kernel: int, dilation: int) -> int:
    """NATTEN's ``get_window_start`` (its naive CPU/CUDA kernels, valid while kernel * dilation <= length)."""
    half = kernel // 2
    if dilation <= 1:
        return max(i - half, 0) + (i + half >= length) * (length - i - half - 1)
    if i - half * dilation < 0:
        return i % dilation
    if i + half * dilation >= length:
        imodd = i % dilation
        a = (length // dilation) * dilation
        b = length - a
        if imodd < b:
            return length - b + imodd - 2 * half * dilation
        return a + imodd - kernel * dilation
    return i - half * dilation


def axis_neighbours(i: int, length: int, kernel: int, dilation: int, causal: bool) -> list[int]:
    if causal:  # the previous kernel positions of the group, itself included
        return [i - t * dilation for t in range(kernel) if i - t * dilation >= 0]
    group = list(range(i % dilation, length, dilation))
    if len(group) <= kernel:  # attnkit's clamp (NATTEN raises here): the whole group
        return group
    start = natten_window_start(i, length, kernel, dilation)
    return [start + t * dilation for t in range(kernel)]


def per_query_loop(q, k, v, grid, kernel, dilation, causal):
    """fp64, one query at a time: softmax over the product of its per-axis neighbours (GQA: heads repeated)."""
    b, t, h, d = q.shape
    k, v = (x.repeat_interleave(h // x.shape[2], dim=2).double() for x in (k, v))
    out = torch.zeros(b, t, h, v.shape[-1], dtype=torch.float64)
    settings = list(zip(grid, kernel, dilation, causal, strict=True))
    for flat, coords in enumerate(itertools.product(*(range(n) for n in grid))):
        per_axis = [axis_neighbours(c, *axis) for c, axis in zip(coords, settings, strict=True)]
        strides = [math.prod(grid[a + 1 :]) for a in range(len(grid))]
        keys = [sum(c * st for c, st in zip(js, strides, strict=True)) for js in itertools.product(*per_axis)]
        s = torch.einsum("bhd,bkhd->bhk", q[:, flat].double(), k[:, keys]) / math.sqrt(d)
        out[:, flat] = torch.einsum("bhk,bkhd->bhd", s.softmax(-1), v[:, keys])
    return out


LITERAL = [
    # grid, options, pattern, per-axis causal the call means
    ((13,), {"kernel_size": 5, "dilation": 2}, "noncausal_self", (False,)),
    ((13,), {"kernel_size": 5, "dilation": 2}, "causal_self", (True,)),
    ((7, 9), {"kernel_size": 3, "dilation": (2, 1)}, "noncausal_self", (False, False)),
    ((7, 9), {"kernel_size": (3, 5), "dilation": (1, 2)}, "noncausal_self", (False, False)),
    ((7, 9), {"kernel_size": 3, "is_causal": (False, True)}, "noncausal_self", (False, True)),
    ((7, 9), {"kernel_size": (5, 3), "dilation": (1, 3)}, "causal_self", (True, False)),
    ((3, 5, 6), {"kernel_size": 3}, "noncausal_self", (False, False, False)),
    ((4, 5, 6), {"kernel_size": 3, "dilation": (1, 1, 2), "is_causal": True}, "causal_self", (True, True, True)),
    ((4, 9), {"kernel_size": 5, "dilation": 2}, "noncausal_self", (False, False)),  # axis 0 clamps
]


def per_axis(value, rank):
    return value if isinstance(value, tuple) else (value,) * rank


@pytest.mark.parametrize(("grid", "options", "pattern", "causal"), LITERAL, ids=str)
def test_paths_follow_natten_query_by_query(grid, options, pattern, causal):
    t = math.prod(grid)
    q, k, v = make_qkv(2, t, t, 4, 2, 8, dtype=torch.float64)
    kernel = per_axis(options["kernel_size"], len(grid))
    dilation = per_axis(options.get("dilation", 1), len(grid))
    expected = per_query_loop(q, k, v, grid, kernel, dilation, causal)
    for path in PATHS:
        out = attnkit.attend(q, k, v, "neighborhood", pattern=pattern, spatial_shape=grid, path=path, **options)
        assert_close(path, expected, out, 1e-10)


@pytest.mark.parametrize("dilation", [1, 2, 3])
def test_every_query_sees_exactly_kernel_keys_shifted_at_borders(dilation):
    """30 x 30 with kernel 7 (the window does not divide the map): 49 keys for every query; a corner's window
    is shifted inwards, never cropped."""
    grid, kernel = (30, 30), 7
    mech = attnkit.create("neighborhood", kernel_size=kernel, dilation=dilation)
    q, k, v = make_qkv(1, 900, 900, 1, 1, 4)
    x = validate(
        mech, q, k, v, pattern="noncausal_self", scale=None, key_padding_mask=None, state=None,
        return_state=False, spatial_shape=grid,
    )  # fmt: skip
    mask = dense_mask(mech.geometry(x).predicate(), 900, 900)[0, 0]  # [T, T]
    assert (mask.sum(-1) == kernel * kernel).all()
    corner = mask[0].view(grid).nonzero().tolist()  # the query at (0, 0)
    rows = sorted({r for r, _ in corner})
    assert rows == [dilation * i for i in range(kernel)]
    assert mech.pairs(grid, Pattern.NONCAUSAL_SELF) == int(mask.sum())


@pytest.mark.parametrize("grid", [(5, 7), (2, 3, 4), (6,)])
def test_kernel_covering_the_grid_is_softmax(grid):
    t = math.prod(grid)
    q, k, v = make_qkv(2, t, t, 4, 2, 16)
    soft = attnkit.attend(q, k, v, pattern="noncausal_self")
    for path in PATHS:
        out = attnkit.attend(q, k, v, "neighborhood", pattern="noncausal_self", spatial_shape=grid, kernel_size=9,
                             path=path)  # fmt: skip
        assert_close(path, soft, out, 1e-5)


def test_tiled_matches_reference_across_tile_borders():
    """A 30 x 30 map (tiles of 8 do not divide it) and a 9 x 10 x 11 volume, with padding and GQA."""
    for grid, options in (((30, 30), {"kernel_size": 7}), ((9, 10, 11), {"kernel_size": 5, "dilation": (1, 2, 1)})):
        t = math.prod(grid)
        q, k, v = make_qkv(2, t, t, 4, 2, 16)
        kpm = torch.rand(2, t, generator=torch.Generator().manual_seed(1)) > 0.2
        for pattern in ("noncausal_self", "causal_self"):
            call = dict(pattern=pattern, spatial_shape=grid, key_padding_mask=kpm, **options)
            ref = attnkit.attend(q, k, v, "neighborhood", path="reference", **call)
            assert_close(f"{grid} {pattern}", ref, attnkit.attend(q, k, v, "neighborhood", path="tiled", **call), 2e-5)


def test_causal_self_forces_the_leading_axis_causal():
    q, k, v = make_qkv(1, 35, 35, 2, 2, 8)
    call = dict(pattern="causal_self", spatial_shape=(5, 7), kernel_size=3)
    given = attnkit.attend(q, k, v, "neighborhood", is_causal=(False, False), **call)
    forced = attnkit.attend(q, k, v, "neighborhood", is_causal=(True, False), **call)
    assert_close("forced", forced, given, 1e-6)


def test_decoding_frame_by_frame_equals_one_call():
    grid = (4, 3, 5)
    q, k, v = make_qkv(1, 60, 60, 2, 1, 8)
    mech = attnkit.create("neighborhood", kernel_size=3, dilation=(2, 1, 1))
    full = mech(q, k, v, pattern="causal_self", spatial_shape=grid)
    state, outs, first = None, [], None
    for f in range(grid[0]):
        sl = slice(15 * f, 15 * (f + 1))
        o, state = mech(q[:, sl], k[:, sl], v[:, sl], pattern="causal_self", spatial_shape=(1, 3, 5), state=state,
                        return_state=True)  # fmt: skip
        outs.append(o)
        first = first or state
    assert_close("decoded", full, torch.cat(outs, 1), 1e-5)
    with pytest.raises(ShapeError, match="whole leading slices"):  # 15 cached tokens are not slices of 4
        mech(q[:, :4], k[:, :4], v[:, :4], pattern="causal_self", spatial_shape=(1, 4, 1), state=first)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"kernel_size": 4}, "odd"),
        ({"kernel_size": 0}, "kernel_size"),
        ({"dilation": 0}, "dilation"),
        ({"is_causal": 1}, "is_causal"),
        ({"is_causal": (True, "no")}, "is_causal"),
        ({"kernel_size": (3, 3), "dilation": (1, 1, 1)}, "one entry per axis"),
        ({"kernel_size": (3, 3, 3, 3)}, "one entry per axis"),
    ],
)
def test_bad_options_are_refused(options, match):
    with pytest.raises(InvalidOption, match=match):
        attnkit.create("neighborhood", **options)


def test_grids_the_options_do_not_fit_are_refused():
    q, k, v = make_qkv(1, 24, 24, 2, 2, 8)
    with pytest.raises(ShapeError, match="2 entries but spatial_shape has 3 axes"):
        attnkit.attend(q, k, v, "neighborhood", pattern="noncausal_self", spatial_shape=(2, 3, 4), kernel_size=(3, 3))
    with pytest.raises(ShapeError, match="1-D, 2-D or 3-D"):
        attnkit.attend(q, k, v, "neighborhood", pattern="noncausal_self", spatial_shape=(2, 2, 2, 3))


def test_tiled_path_builds_nothing_quadratic():
    """The largest tensor grows linearly with the map: 4x the tokens, at most ~4x the largest tensor."""
    sizes = {}
    for side in (32, 64):
        t = side * side
        q, k, v = make_qkv(1, t, t, 2, 2, 16)
        call = dict(pattern="noncausal_self", spatial_shape=(side, side), kernel_size=7, path="tiled")
        sizes[side], shape = largest_tensor(
            lambda q=q, k=k, v=v, call=call: attnkit.attend(q, k, v, "neighborhood", **call)
        )
        # at most one score per (query, halo key, head): 14 x 14 halo keys for 8 x 8 tiles and kernel 7
        assert sizes[side] <= t * 14 * 14 * 2, f"{side}x{side}: a tensor of shape {shape}"
    assert sizes[64] <= 4.5 * sizes[32] and sizes[64] < 4096 * 4096 / 8


def test_flops_count_visible_pairs_on_a_square_map():
    mech = attnkit.create("neighborhood", kernel_size=7)
    shape = Shape(1, 4096, 4096, 4, 4, 32, 32)
    assert mech.flops(shape, Pattern.NONCAUSAL_SELF) == 2.0 * 4 * 4096 * 49 * 64
    assert mech.flops(shape, Pattern.CAUSAL_SELF) < mech.flops(shape, Pattern.NONCAUSAL_SELF)


def test_flops_count_on_the_calls_own_grid():
    mech = attnkit.create("neighborhood", kernel_size=7)
    # a 4 x 1024 strip: the leading axis is shorter than the kernel, so every query sees 4 x 7 keys, not 49
    flat = Shape(1, 4096, 4096, 4, 4, 32, 32, grid=(4, 1024))
    assert mech.flops(flat, Pattern.NONCAUSAL_SELF) == 2.0 * 4 * 4096 * 28 * 64
