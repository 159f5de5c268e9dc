"""Multi-axis attention — MaxViT: Multi-Axis Vision Transformer (Tu et al., 2022, arXiv:2204.01697).

    block(i) = softmax attention of i over the tokens of its block_size x block_size block (local)
    grid(i)  = softmax attention of i over the tokens at i's position in every cell of a grid_size x grid_size
               grid of cells (sparse global: a dilated attention with stride = cell side = H / grid_size)
    out_i    = (block(i) + grid(i)) / 2

MaxViT applies block attention and grid attention in two consecutive layers, each with its own projections. A
single mechanism call must be a function of q, k, v alone, so here both branches share q, k, v and their outputs
are *averaged* (as ``axial`` averages its axes), rather than splitting the heads between them (as CSWin splits its
stripes): every head then sees both the local block and the dilated global grid, as every MaxViT token does after
its two layers, the output is a convex combination of values on the scale of one softmax attention, and any number
of heads works (one head, an odd count, any GQA grouping). Choices where the paper is vague:
- 2-D grids only (``spatial_dims = (2,)``), non-causal self-attention only (MaxViT is an image backbone).
- A side that block_size does not divide is padded at its end to whole blocks; a side that grid_size does not
  divide is padded at its end to grid_size cells of ceil(side / grid_size) tokens, so the grid's stride is that
  cell side. The padded positions are *masked* keys, never read (MaxViT's code requires divisible feature maps);
  a grid_size larger than a side gives cells of one token, i.e. the whole line along that side.
- MaxViT's learned relative position bias belongs to its layer, not to this parameter-free mechanism.
- A branch in which a query sees no key (all its keys padded) contributes 0 to the mean; so does a query seeing
  nothing at all.

The ``partitioned`` path pads the grid, cuts it into blocks and into grid groups by one reshape each, and runs one
batched SDPA over all blocks and one over all groups: O(T · (block^2 + grid^2) · D) time, memory O(T · (block^2 +
grid^2)) at most, never a T x T tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import ShapeError
from ..inputs import AttentionInputs
from ..mechanism import Complexity, Mechanism, Paper, Shape, fast_path, register_mechanism
from ..ops.masking import masked_softmax, visibility
from ..ops.reference import compute_dtype, upcast_qkv
from ..ops.sdpa import sdpa
from ..ops.spatial import call_grid, from_grid, to_grid
from ..options import check_int
from ..patterns import MaskPredicate, Pattern


@dataclass(frozen=True)
class MultiAxisOptions:
    block_size: int = 7  # side P of the non-overlapping local blocks (block attention)
    grid_size: int = 7  # G: the map is cut into G x G cells; tokens at one place in every cell attend (grid attention)

    def __post_init__(self):
        check_int("multi_axis", "block_size", self.block_size, minimum=1)
        check_int("multi_axis", "grid_size", self.grid_size, minimum=1)


@dataclass(frozen=True)
class _Layout:
    """One call's grid cut two ways: per axis, the block side and the grid's cell side (its stride)."""

    shape: tuple[int, int]
    block: int
    grid: int

    @property
    def cell(self) -> tuple[int, int]:
        """Side of one grid cell per axis = the stride between the tokens of one grid group."""
        return tuple(-(-s // self.grid) for s in self.shape)

    def padded(self, branch: str) -> tuple[int, int]:
        if branch == "block":
            return tuple(-(-s // self.block) * self.block for s in self.shape)
        return tuple(c * self.grid for c in self.cell)


def _coord(idx: torch.Tensor, shape: tuple[int, ...], axis: int) -> torch.Tensor:
    """Coordinate on ``axis`` of row-major token index ``idx``."""
    return (idx // math.prod(shape[axis + 1 :])) % shape[axis]


def _block_rule(lay: _Layout) -> MaskPredicate:
    """Keys in the query's block: the same block index on both axes."""

    def pred(b, h, q_idx, kv_idx):
        seen = kv_idx >= 0
        for axis in range(2):
            cq, ck = _coord(q_idx, lay.shape, axis), _coord(kv_idx, lay.shape, axis)
            seen = seen & (cq // lay.block == ck // lay.block)
        return seen

    return pred


def _grid_rule(lay: _Layout) -> MaskPredicate:
    """Keys at the query's place within their grid cell: the same coordinate modulo the cell side on both axes."""

    def pred(b, h, q_idx, kv_idx):
        seen = kv_idx >= 0
        for axis, cell in enumerate(lay.cell):
            cq, ck = _coord(q_idx, lay.shape, axis), _coord(kv_idx, lay.shape, axis)
            seen = seen & (cq % cell == ck % cell)
        return seen

    return pred


def _pad_end(t: torch.Tensor, extra: tuple[int, int], value=0) -> torch.Tensor:
    """Pad the two grid axes of ``[B, h, w, *rest]`` at their ends (F.pad lists the last axis first)."""
    pads = [0, 0] * (t.dim() - 3) + [0, extra[1], 0, extra[0]]
    return F.pad(t, pads, value=value) if any(extra) else t


def _partition(t: torch.Tensor, outer: tuple[int, int], inner: tuple[int, int], branch: str) -> torch.Tensor:
    """``[B, oh*ih, ow*iw, *rest] -> [B * groups, members, *rest]``.

    block: a group is one block (fixed outer index), its members the inner positions; grid: a group is one place
    within the cells (fixed inner index), its members the cells."""
    b, rest = t.shape[0], t.shape[3:]
    t = t.reshape(b, outer[0], inner[0], outer[1], inner[1], *rest)
    tail = list(range(5, 5 + len(rest)))
    perm = [0, 1, 3, 2, 4] if branch == "block" else [0, 2, 4, 1, 3]
    t = t.permute(*perm, *tail)  # [B, groups_h, groups_w, members_h, members_w, *rest]
    return t.reshape(b * t.shape[1] * t.shape[2], t.shape[3] * t.shape[4], *rest)


def _unpartition(t: torch.Tensor, b: int, outer: tuple[int, int], inner: tuple[int, int], branch: str) -> torch.Tensor:
    """Inverse of :func:`_partition`: ``[B * groups, members, *rest] -> [B, oh*ih, ow*iw, *rest]``."""
    rest = t.shape[2:]
    tail = list(range(5, 5 + len(rest)))
    if branch == "block":  # [B, oh, ow, ih, iw] -> [B, oh, ih, ow, iw]
        t = t.reshape(b, outer[0], outer[1], inner[0], inner[1], *rest).permute(0, 1, 3, 2, 4, *tail)
    else:  # [B, ih, iw, oh, ow] -> [B, oh, ih, ow, iw]
        t = t.reshape(b, inner[0], inner[1], outer[0], outer[1], *rest).permute(0, 3, 1, 4, 2, *tail)
    return t.reshape(b, outer[0] * inner[0], outer[1] * inner[1], *rest)


@register_mechanism("multi_axis")
class MultiAxis(Mechanism):
    family = "spatial"
    paper = Paper("MaxViT: Multi-Axis Vision Transformer", 2022, "2204.01697")
    patterns = frozenset({Pattern.NONCAUSAL_SELF})
    exact = False  # the mean of a block and a grid softmax attention, not softmax over the grid
    spatial = True
    spatial_dims = (2,)
    complexity = Complexity(time="O(T·(block²+grid²)·D)", memory="O(T·(block²+grid²))")
    Options = MultiAxisOptions
    example_options = ({"block_size": 3, "grid_size": 3}, {"block_size": 4, "grid_size": 2})
    fidelity_knob = ("block_size", (4, 7, 14))

    def check_call(self, x: AttentionInputs) -> None:
        super().check_call(x)
        self._layout(x.spatial_shape)

    def _layout(self, shape: tuple[int, ...]) -> _Layout:
        if len(shape) not in self.spatial_dims:
            raise ShapeError(f"multi_axis takes grids of {self.spatial_dims} axes (rows, columns); got {shape}")
        return _Layout(tuple(shape), self.options.block_size, self.options.grid_size)

    def mask_predicates(self, spatial_shape: tuple[int, ...]) -> dict[str, MaskPredicate]:
        """The block rule and the grid rule on a grid of this shape (the output is the mean of the two)."""
        lay = self._layout(tuple(spatial_shape))
        return {"block": _block_rule(lay), "grid": _grid_rule(lay)}

    # ---- reference: two masked softmax attentions over the whole grid, averaged ----------------------

    def reference(self, x: AttentionInputs):
        q, k, v = upcast_qkv(x)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * x.scale  # [B, H, T, T]
        out = 0
        for rule in self.mask_predicates(x.spatial_shape).values():
            probs = masked_softmax(scores, visibility(x, rule))  # [B, H, T, T]; a row seeing nothing is 0
            out = out + torch.einsum("bhqk,bkhd->bqhd", probs, v)  # [B, T, H, Dv]
        return (out / 2).to(x.q.dtype), None

    # ---- fast path: blocks -> one batched SDPA, grid groups -> another --------------------------------

    @fast_path("partitioned", priority=10)
    def partitioned(self, x: AttentionInputs):
        lay = self._layout(x.spatial_shape)
        acc = compute_dtype(x.q.dtype)  # the two branches add up in fp32 (fp64 stays fp64)
        total = 0
        for branch in ("block", "grid"):
            total = total + self._branch(x, lay, branch).to(acc)
        return (total / 2).to(x.q.dtype), None

    def _branch(self, x: AttentionInputs, lay: _Layout, branch: str) -> torch.Tensor:
        """Softmax attention within every block (or grid group): ``[B, T, Hq, Dv]``."""
        b, shape = x.batch, lay.shape
        padded = lay.padded(branch)
        extra = tuple(p - s for p, s in zip(padded, shape, strict=True))
        if branch == "block":
            inner = (lay.block, lay.block)
            outer = tuple(p // lay.block for p in padded)
        else:
            inner, outer = lay.cell, (lay.grid, lay.grid)
        q, k, v = (_partition(_pad_end(to_grid(t, shape), extra), outer, inner, branch) for t in (x.q, x.k, x.v))
        if x.key_padding_mask is None and not any(extra):
            out = sdpa(q, k, v, scale=x.scale)  # whole groups of real tokens: no mask
        else:
            valid = x.key_padding_mask
            valid = torch.ones(b, x.tk, dtype=torch.bool, device=x.q.device) if valid is None else valid
            valid = _partition(_pad_end(valid.view(b, *shape), extra, value=False), outer, inner, branch)  # [N, L]
            mask = valid[:, None, None, :].expand(-1, -1, q.shape[1], -1)  # [N, 1, L, L]
            seen = mask.any(-1, keepdim=True)  # [N, 1, L, 1]
            # a row that sees no key attends to all (finite, no NaN in any gradient), then is set to 0
            out = sdpa(q, k, v, scale=x.scale, mask=mask | ~seen)  # [N, L, Hq, Dv]
            out = torch.where(seen.transpose(1, 2), out, torch.zeros((), dtype=out.dtype, device=out.device))
        out = _unpartition(out, b, outer, inner, branch)[:, : shape[0], : shape[1]]  # [B, h, w, Hq, Dv]
        return from_grid(out)

    def flops(self, shape: Shape, pattern: Pattern) -> float:
        # keys per query: its block (block_size per axis) and its grid group (grid_size per axis), each at most
        # the axis of the call's grid (else a square one)
        grid = call_grid(shape.grid, shape.tq)
        keys = sum(math.prod(min(s, n) for n in grid) for s in (self.options.block_size, self.options.grid_size))
        return 2.0 * shape.batch * shape.heads * shape.tq * keys * (shape.dk + shape.dv)
