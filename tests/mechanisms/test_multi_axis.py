"""multi_axis: MaxViT's block and grid attention, averaged; borders of grids that do not divide."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from largest_tensor import largest_tensor

import attnkit
from attnkit.errors import InvalidOption, ShapeError, UnsupportedPattern
from attnkit.testing import assert_close, make_qkv

PATHS = ("reference", "partitioned")


def _attend_rows(q, k, v, i, keys):
    """fp64 softmax attention of token ``i`` over the token indices ``keys``: ``[B, H, Dv]`` (0 when none)."""
    if not keys:
        return torch.zeros(q.shape[0], q.shape[2], v.shape[-1], dtype=torch.float64)
    keys = torch.tensor(keys)
    s = torch.einsum("bhd,bkhd->bhk", q[:, i].double(), k[:, keys].double()) / math.sqrt(q.shape[-1])
    return torch.einsum("bhk,bkhd->bhd", s.softmax(-1), v[:, keys].double())


def maxvit_literal(q, k, v, shape, block, grid, real=None):
    """MaxViT one query at a time: the mean of its block (same r // P, c // P) and its grid group (same place
    r % cell, c % cell within cells of side ceil(side / G)), over the real keys only."""
    h, w = shape
    cell = (-(-h // grid), -(-w // grid))
    coords = list(itertools.product(range(h), range(w)))
    real = set(range(h * w)) if real is None else real
    out = torch.zeros(q.shape[0], h * w, q.shape[2], v.shape[-1], dtype=torch.float64)
    for i, (r, c) in enumerate(coords):
        blk = [j for j, (kr, kc) in enumerate(coords) if (kr // block, kc // block) == (r // block, c // block)]
        grp = [j for j, (kr, kc) in enumerate(coords) if (kr % cell[0], kc % cell[1]) == (r % cell[0], c % cell[1])]
        blk, grp = [j for j in blk if j in real], [j for j in grp if j in real]
        out[:, i] = (_attend_rows(q, k, v, i, blk) + _attend_rows(q, k, v, i, grp)) / 2
    return out


@pytest.mark.parametrize(
    "shape,block,grid",
    [
        ((6, 6), 3, 2),  # whole blocks and cells: the path runs without a mask
        ((7, 9), 3, 3),  # both pad: blocks to 9 x 9, cells of 3 x 3
        ((10, 7), 4, 3),  # cells of 4 x 3 on a 12 x 9 padded grid
        ((5, 11), 2, 4),
    ],
)
def test_block_and_grid_follow_maxvit(shape, block, grid):
    t = math.prod(shape)
    q, k, v = make_qkv(2, t, t, 4, 2, 8, dtype=torch.float64)  # GQA: 4 query heads on 2 kv heads
    k2, v2 = k.repeat_interleave(2, dim=2), v.repeat_interleave(2, dim=2)
    expected = maxvit_literal(q, k2, v2, shape, block, grid)
    for path in PATHS:
        out = attnkit.attend(
            q,
            k,
            v,
            "multi_axis",
            pattern="noncausal_self",
            spatial_shape=shape,
            path=path,
            block_size=block,
            grid_size=grid,
        )
        assert_close(path, expected, out, 1e-10)


def test_key_padding_masks_keys_where_they_stand_and_nan_does_not_leak():
    shape = (7, 9)
    t = math.prod(shape)
    q, k, v = make_qkv(2, t, t, 2, 2, 8, dtype=torch.float64)
    kpm = torch.rand(2, t, generator=torch.Generator().manual_seed(3)) > 0.4
    kpm[1, :] = False
    kpm[1, 0] = True  # row 1: one real key, so most blocks and groups see nothing
    k, v = k.masked_fill(~kpm[:, :, None, None], float("nan")), v.masked_fill(~kpm[:, :, None, None], float("nan"))
    real = [set(kpm[b].nonzero().flatten().tolist()) for b in range(2)]
    rows = [maxvit_literal(q[b : b + 1], k[b : b + 1], v[b : b + 1], shape, 3, 3, real[b]) for b in range(2)]
    expected = torch.cat(rows)
    for path in PATHS:
        out = attnkit.attend(
            q,
            k,
            v,
            "multi_axis",
            pattern="noncausal_self",
            spatial_shape=shape,
            key_padding_mask=kpm,
            path=path,
            block_size=3,
            grid_size=3,
        )
        assert not out.isnan().any(), path
        assert_close(path, expected, out, 1e-10)


@pytest.mark.parametrize("shape", [(5, 6), (7, 7)])
def test_a_block_covering_the_grid_and_cells_of_one_token_are_softmax(shape):
    """block_size >= both sides: one block; grid_size >= both sides: cells of one token, so one group of all."""
    t = math.prod(shape)
    q, k, v = make_qkv(2, t, t, 4, 2, 16)
    soft = attnkit.attend(q, k, v, pattern="noncausal_self")
    for path in PATHS:
        out = attnkit.attend(
            q, k, v, "multi_axis", pattern="noncausal_self", spatial_shape=shape, path=path, block_size=7, grid_size=8
        )
        assert_close(path, soft, out, 1e-5)


def test_blocks_of_one_token_leave_the_grid_branch_and_the_value_itself():
    """block_size 1: the block branch returns the query's own value, so out = (v_i + grid_i) / 2."""
    shape = (6, 8)
    q, k, v = make_qkv(1, 48, 48, 2, 2, 8, dtype=torch.float64)
    i = 2 * 8 + 5  # (2, 5); grid 2 on (6, 8): cells of 3 x 4, group rows {2, 5}, columns {1, 5}
    grp = [r * 8 + c for r in (2, 5) for c in (1, 5)]
    expected = (v[:, i].double() + _attend_rows(q, k, v, i, grp)) / 2
    for path in PATHS:
        out = attnkit.attend(
            q, k, v, "multi_axis", pattern="noncausal_self", spatial_shape=shape, path=path, block_size=1, grid_size=2
        )
        assert_close(path, expected, out[:, i], 1e-10)


def test_the_last_block_and_group_of_a_grid_that_does_not_divide_hold_only_real_tokens():
    """(7, 9), block 4, grid 2: query (6, 8) has block rows 4..6 x column 8 (3 keys); cells are 4 x 5, so its
    group is rows {2, 6} x columns {3, 8} (the padded rows 10 and columns 13 are never seen)."""
    q, k, v = make_qkv(1, 63, 63, 2, 2, 8, dtype=torch.float64)
    i = 6 * 9 + 8
    blk = [4 * 9 + 8, 5 * 9 + 8, 6 * 9 + 8]
    grp = [r * 9 + c for r in (2, 6) for c in (3, 8)]
    expected = (_attend_rows(q, k, v, i, blk) + _attend_rows(q, k, v, i, grp)) / 2
    for path in PATHS:
        out = attnkit.attend(
            q, k, v, "multi_axis", pattern="noncausal_self", spatial_shape=(7, 9), path=path, block_size=4, grid_size=2
        )
        assert_close(path, expected, out[:, i], 1e-10)


def test_bf16_matches_fp32_and_keeps_its_dtype():
    q, k, v = make_qkv(2, 70, 70, 4, 2, 16)
    opts = {"pattern": "noncausal_self", "spatial_shape": (7, 10), "block_size": 3, "grid_size": 3}
    exact = attnkit.attend(q, k, v, "multi_axis", path="reference", **opts)
    out = attnkit.attend(q.bfloat16(), k.bfloat16(), v.bfloat16(), "multi_axis", path="partitioned", **opts)
    assert out.dtype == torch.bfloat16
    assert_close("partitioned bf16", exact, out.float(), 2e-2)


@pytest.mark.parametrize(
    "opts,words",
    [
        ({"block_size": 0}, ["block_size=0", ">= 1"]),
        ({"grid_size": "7"}, ["grid_size='7'", "integer"]),
        ({"grid_size": -2}, ["grid_size=-2"]),
        ({"block": 4}, ["'block'", "block_size"]),
    ],
)
def test_bad_options_are_refused(opts, words):
    with pytest.raises(InvalidOption) as err:
        attnkit.create("multi_axis", **opts)
    assert all(w in str(err.value) for w in words), str(err.value)


def test_bad_grids_and_patterns_are_refused_before_compute():
    q, k, v = make_qkv(1, 24, 24, 2, 2, 8)
    mech = attnkit.create("multi_axis", block_size=2, grid_size=2)
    for bad in ((24,), (2, 3, 4)):
        with pytest.raises(ShapeError, match=r"multi_axis takes grids of \(2,\) axes"):
            mech(q, k, v, pattern="noncausal_self", spatial_shape=bad)
    with pytest.raises(ShapeError, match="spatial_shape"):
        mech(q, k, v, pattern="noncausal_self", spatial_shape=(5, 5))
    with pytest.raises(UnsupportedPattern):
        mech(q, k, v, pattern="causal_self", spatial_shape=(4, 6))


def test_the_partitioned_path_never_builds_a_t_by_t_tensor():
    t = 30 * 30  # 30 does not divide into blocks of 4 or cells of grid 7: the masked case
    q, k, v = make_qkv(1, t, t, 2, 2, 8)
    mech = attnkit.create("multi_axis", block_size=4, grid_size=7)
    kpm = torch.ones(1, t, dtype=torch.bool)
    kpm[0, :5] = False

    def run(path):
        return largest_tensor(
            lambda: mech(q, k, v, pattern="noncausal_self", spatial_shape=(30, 30), key_padding_mask=kpm, path=path)
        )

    fast, shape = run("partitioned")
    ref, _ = run("reference")
    assert ref >= t * t  # the check can see a T x T tensor
    assert fast <= 2 * t * (4**2 + 7**2), f"largest tensor {shape}"  # T x (block^2 + grid^2) on the padded grid
