"""Rectangular regions of a 2-D grid, laid out region-major (BiFormer's regions, bilevel_routing's grid form).

A ``(h, w)`` grid of row-major tokens is cut into regions of ``(rh, rw)`` cells, counted from the top-left
corner; regions are numbered row-major too (``ceil(h / rh) x ceil(w / rw)`` of them). The last region row and
column are partial when the region does not divide the grid. :func:`to_regions` puts each region's tokens into
``rh * rw`` consecutive slots (its cells row-major), the cells past the grid's edge as zero slots, so that the
1-D block machinery (``ops.topk_sparse``, blocks of ``rh * rw`` slots) works on regions unchanged, with the
edge slots masked as not real; :func:`from_regions` is its inverse. Nothing reads outside the grid.
"""

from __future__ import annotations

import math

import torch

from .spatial import grid_coords


def region_counts(grid: tuple[int, int], region: tuple[int, int]) -> tuple[int, int]:
    """Regions per axis: ``(ceil(h / rh), ceil(w / rw))``."""
    return -(-grid[0] // region[0]), -(-grid[1] // region[1])


def region_of_token(grid: tuple[int, int], region: tuple[int, int], device=None) -> torch.Tensor:
    """``[h * w]`` int64: the region of each token of the row-major grid, from its coordinates."""
    coords = grid_coords(grid, device)  # [T, 2]
    per_row = region_counts(grid, region)[1]
    return (coords[:, 0] // region[0]) * per_row + coords[:, 1] // region[1]


def to_regions(t: torch.Tensor, grid: tuple[int, int], region: tuple[int, int]) -> torch.Tensor:
    """``t [B, h*w, ...]`` (row-major tokens) -> ``[B, nR * rh * rw, ...]``: region n holds slots
    ``[n * rh * rw, (n + 1) * rh * rw)``; slots past the grid's edge hold zeros (False for a bool mask)."""
    (h, w), (rh, rw) = grid, region
    nh, nw = region_counts(grid, region)
    b, rest = t.shape[0], t.shape[2:]
    padded = t.new_zeros(b, nh * rh, nw * rw, *rest)
    padded[:, :h, :w] = t.reshape(b, h, w, *rest)
    tiles = padded.reshape(b, nh, rh, nw, rw, math.prod(rest)).transpose(2, 3)  # [B, nh, nw, rh, rw, R]
    return tiles.reshape(b, nh * nw * rh * rw, *rest)


def from_regions(t: torch.Tensor, grid: tuple[int, int], region: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`to_regions`: ``[B, nR * rh * rw, ...] -> [B, h*w, ...]`` (edge slots dropped)."""
    (h, w), (rh, rw) = grid, region
    nh, nw = region_counts(grid, region)
    b, rest = t.shape[0], t.shape[2:]
    tiles = t.reshape(b, nh, nw, rh, rw, math.prod(rest)).transpose(2, 3)  # [B, nh, rh, nw, rw, R]
    return tiles.reshape(b, nh * rh, nw * rw, math.prod(rest))[:, :h, :w].reshape(b, h * w, *rest)
