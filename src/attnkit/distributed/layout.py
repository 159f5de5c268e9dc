"""Where each token of a sequence lives when it is split over W ranks (DESIGN §6).

- ``contiguous``: rank r holds tokens ``[r·n, (r+1)·n)`` with ``n = T / W``.
- ``zigzag``: the sequence is cut into 2W chunks of ``c = T / (2W)`` tokens; rank r holds chunks r and
  ``2W-1-r`` (in that order), so every rank has as much causal work as every other (ring-flash-attn's zigzag,
  torch's head-tail load balancer).

Layouts are pure index functions (``order``, ``positions``) with their inverse, so that tests and users shard and
unshard the same way. A length the layout cannot split is refused with a :class:`~attnkit.errors.ShapeError` that
says how to pad (:func:`padded_length`, and mask the padding with a key padding mask).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..errors import InvalidOption, ShapeError
from ._collectives import all_gather_flat

LAYOUTS = ("zigzag", "contiguous")


def check_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise InvalidOption(f"layout={layout!r} is not valid; expected one of {', '.join(LAYOUTS)}")
    return layout


def pieces(world: int, layout: str) -> int:
    """How many equal pieces the sequence is cut into: W (contiguous) or 2W (zigzag)."""
    return world * (2 if check_layout(layout) == "zigzag" else 1)


def padded_length(total: int, world: int, layout: str) -> int:
    """The smallest length >= ``total`` the layout can split over ``world`` ranks."""
    p = pieces(world, layout)
    return -(-total // p) * p


def check_length(total: int, world: int, layout: str) -> None:
    p = pieces(world, layout)
    if total % p:
        raise ShapeError(
            f"a sequence of T={total} tokens cannot be split {layout} over W={world} ranks: T must be a multiple of "
            f"{p}. Pad it to {padded_length(total, world, layout)} tokens and mark the padding False in "
            f"key_padding_mask (attnkit.distributed.padded_length), or use another layout"
        )


def order(total: int, world: int, layout: str) -> torch.Tensor:
    """``[T]`` int64: the global positions of the tokens of rank 0, then rank 1, ... (each rank's in local order)."""
    check_length(total, world, layout)
    if layout == "contiguous":
        return torch.arange(total)
    c = total // (2 * world)
    chunks = torch.arange(total).view(2 * world, c)
    return torch.cat([torch.cat([chunks[r], chunks[2 * world - 1 - r]]) for r in range(world)])


def positions(total: int, world: int, rank: int, layout: str) -> torch.Tensor:
    """``[T / W]`` int64: the global positions of the tokens rank ``rank`` holds, in local order."""
    n = total // world
    return order(total, world, layout)[rank * n : (rank + 1) * n]


def shard(x: torch.Tensor, world: int, rank: int, layout: str = "zigzag", dim: int = 1) -> torch.Tensor:
    """The part of a full tensor (tokens along ``dim``: ``[B, T, H, D]`` or a mask ``[B, T]``) that ``rank``
    holds. A pure index operation: every rank can shard the same full tensor."""
    return x.index_select(dim, positions(x.shape[dim], world, rank, layout).to(x.device))


def unshard(local: torch.Tensor, group: dist.ProcessGroup | None = None, layout: str = "zigzag", dim: int = 1):
    """The full tensor from every rank's shard (an all-gather, then the layout's order undone). No gradient."""
    world = dist.get_world_size(group)
    moved = local.detach().movedim(dim, 0).contiguous()  # [n, ...]
    flat = torch.empty(world * moved.numel(), dtype=moved.dtype, device=moved.device)
    all_gather_flat(flat, moved.reshape(-1), group=group)  # gloo: a flat output, not [W, n]
    gathered = flat.view(world * moved.shape[0], *moved.shape[1:])  # rank-major
    full = torch.empty_like(gathered)
    full[order(gathered.shape[0], world, layout).to(gathered.device)] = gathered
    return full.movedim(0, dim)
