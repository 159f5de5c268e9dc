"""Adaptive average pooling of row-major 2-D grids of tokens into cells (Agent Attention's pooled agents).

A side of ``L`` tokens cut into ``a <= L`` cells is cut as ``torch.nn.AdaptiveAvgPool2d`` cuts it: cell ``i``
holds tokens ``floor(i·L/a) .. ceil((i+1)·L/a) - 1``, so neighbouring cells share a token when ``a`` does not
divide ``L`` and every cell holds one. A 2-D cell is a row band times a column band. With a key padding mask
a cell's mean is over its real tokens only (a cell with none is empty: ``valid`` False, its mean 0); unlike
``ops/low_rank``'s segments, the cells are fixed by the grid, so padding is not "as if removed".
"""

from __future__ import annotations

import torch

from .spatial import squarest_grid


def agent_grid(num_agents: int, shape: tuple[int, int]) -> tuple[int, int]:
    """The ``a_h × a_w`` cell grid for ``num_agents`` cells on a ``shape = (h, w)`` map: the squarest factor pair
    of ``num_agents`` (``49 -> 7 × 7``, ``8 -> 2 × 4``), its longer side along the map's longer side, each side
    clipped to the map's (a side shorter than its cells: each token its own cell)."""
    short, long = squarest_grid(num_agents, 2)
    a_h, a_w = (long, short) if shape[0] > shape[1] else (short, long)
    return min(a_h, shape[0]), min(a_w, shape[1])


def adaptive_bounds(length: int, cells: int) -> list[tuple[int, int]]:
    """``[start, end)`` of each of ``cells`` cells on a side of ``length`` tokens, as adaptive average pooling."""
    return [(i * length // cells, -(-(i + 1) * length // cells)) for i in range(cells)]


def cell_indicator(length: int, cells: int, device, dtype) -> torch.Tensor:
    """``[cells, length]``: 1 where the token lies in the cell (a band of rows or of columns)."""
    pos = torch.arange(length, device=device)
    bounds = torch.tensor(adaptive_bounds(length, cells), device=device)  # [cells, 2]
    return ((pos >= bounds[:, :1]) & (pos < bounds[:, 1:])).to(dtype)


def grid_cell_means(
    x: torch.Tensor, mask: torch.Tensor | None, shape: tuple[int, int], cells: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of ``x [B, T, H, D]`` (row-major on ``shape``) over each cell of its real tokens -> ``[B, n, H, D]``
    (``n = a_h·a_w``, cells row-major) and which cells hold a real token ``[B|1, n]``. Separable: a sum over the
    row bands, then the column bands; the largest intermediate is ``[B, a_h, w, H, D]``, no ``[n, T]`` tensor."""
    b, _, heads, d = x.shape
    rows = cell_indicator(shape[0], cells[0], x.device, x.dtype)  # [a_h, h]
    cols = cell_indicator(shape[1], cells[1], x.device, x.dtype)  # [a_w, w]
    grid = x.view(b, *shape, heads, d)
    if mask is not None:  # by selection: a padded query's content never enters a mean
        real = mask.view(b, *shape, 1, 1)
        grid = torch.where(real, grid, torch.zeros((), dtype=x.dtype, device=x.device))
    sums = torch.einsum("jc,bicnd->bijnd", cols, torch.einsum("ir,brcnd->bicnd", rows, grid))  # [B, a_h, a_w, H, D]
    if mask is None:
        counts = torch.outer(rows.sum(1), cols.sum(1)).reshape(1, -1)  # [1, n]
    else:
        counts = torch.einsum("ir,jc,brc->bij", rows, cols, mask.view(b, *shape).to(x.dtype)).reshape(b, -1)
    means = sums.reshape(b, -1, heads, d) / counts.clamp(min=1)[:, :, None, None]
    return means, counts > 0


def cell_pool_matrix(
    mask: torch.Tensor | None, shape: tuple[int, int], cells: tuple[int, int], device, dtype
) -> torch.Tensor:
    """The averaging matrix ``P [B|1, n, T]`` written out cell by cell, for references: row ``c`` holds
    ``1/|real tokens of cell c|`` on them, so ``P @ x`` is the cells' means (an empty cell's row is 0)."""
    h, w = shape
    member = torch.zeros(cells[0] * cells[1], h, w, dtype=torch.bool, device=device)
    for i, (r0, r1) in enumerate(adaptive_bounds(h, cells[0])):
        for j, (c0, c1) in enumerate(adaptive_bounds(w, cells[1])):
            member[i * cells[1] + j, r0:r1, c0:c1] = True
    member = member.view(1, -1, h * w)  # [1, n, T]
    if mask is not None:
        member = member & mask[:, None, :]  # [B, n, T]: the cell's real tokens
    weights = member.to(dtype)
    return weights / weights.sum(-1, keepdim=True).clamp(min=1)
