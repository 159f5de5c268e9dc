"""Tokens on a grid: the row-major layout of spatial mechanisms (``spatial_shape=(h, w)`` or ``(d, h, w)``).

Spatial mechanisms take ``[B, T, H, D]`` tokens flattened row-major (the last axis fastest), with
``prod(spatial_shape) == T`` checked by ``inputs.validate``. These helpers move between that layout and
``[B, *spatial_shape, H, D]`` grids, give each token its coordinates, and pad a grid to whole windows.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def squarest_grid(t: int, rank: int) -> tuple[int, ...]:
    """A grid of ``rank`` axes holding ``t`` tokens, as square as ``t``'s divisors allow, the leading axis the
    shortest: ``squarest_grid(4096, 2) == (64, 64)``, ``(63, 2) -> (7, 9)``, ``(200, 3) -> (5, 5, 8)``."""
    if rank == 1:
        return (t,)
    a = max(a for a in range(1, t + 1) if t % a == 0 and a**rank <= t)
    return (a, *squarest_grid(t // a, rank - 1))


def call_grid(grid: tuple[int, ...] | None, tokens: int, rank: int = 2) -> tuple[int, ...]:
    """The grid a FLOP formula counts on: the call's own (``Shape.grid``) when it has one, else the squarest
    grid of ``rank`` axes holding ``tokens`` (the benchmark's square image)."""
    return tuple(grid) if grid else squarest_grid(tokens, rank)


def to_grid(t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """``[B, T, H, D] -> [B, *shape, H, D]`` (a view)."""
    b, n, h, d = t.shape
    if math.prod(shape) != n:
        raise ValueError(f"spatial shape {shape} has {math.prod(shape)} positions, not T={n}")
    return t.view(b, *shape, h, d)


def from_grid(t: torch.Tensor) -> torch.Tensor:
    """``[B, *shape, H, D] -> [B, T, H, D]`` (a copy only when ``t`` is not contiguous)."""
    b, h, d = t.shape[0], t.shape[-2], t.shape[-1]
    return t.reshape(b, -1, h, d)


def grid_coords(shape: tuple[int, ...], device: torch.device | str | None = None) -> torch.Tensor:
    """Coordinates of every token in row-major order: ``[T, len(shape)]`` int64 (token i at ``coords[i]``)."""
    axes = [torch.arange(s, device=device) for s in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(shape))


def pad_grid(t: torch.Tensor, multiples: tuple[int, ...]) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Zero-pad the spatial axes of ``[B, *shape, H, D]`` at their ends up to multiples of ``multiples``.

    Returns the padded grid and the padding added per axis (callers mask the padded positions)."""
    shape = t.shape[1:-2]
    if len(multiples) != len(shape):
        raise ValueError(f"{len(multiples)} window sizes for a {len(shape)}-D grid")
    extra = tuple((-s) % m for s, m in zip(shape, multiples, strict=True))
    if not any(extra):
        return t, extra
    # F.pad lists the last axis first; H and D (the last two axes) get no padding
    pads = [0, 0, 0, 0]
    for e in reversed(extra):
        pads += [0, e]
    return F.pad(t, pads), extra
