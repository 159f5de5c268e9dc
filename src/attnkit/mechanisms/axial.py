"""Axial attention — Axial Attention in Multidimensional Transformers (Ho et al., 2019, arXiv:1912.12180).

    A_a(i) = sum_{j on the line through i along axis a} softmax_j(scale * q_i . k_j) v_j
    out_i  = (1 / d) * sum_{a = 1..d} A_a(i)          (d = 2: rows and columns; d = 3: + depth)

The paper applies the per-axis attentions in separate layers (or sums them with separate projections). A single
mechanism call must be a function of q, k, v alone, so here the axes share q, k, v and their outputs are
*averaged*: each output is then a convex combination of values, on the scale of one softmax attention whatever
the grid's rank (a sum would grow with it). A query's receptive field is the union of its lines, as in the paper's
"full receptive field in two layers" construction. Choices where the paper is vague:
- causal_self is causal on every axis, the rule of the paper's autoregressive (raster-order) variant: along the
  leading axis (frames, rows) a query sees its own and earlier slices (its masked column attention), along the
  other axes earlier or equal positions of its own line (its masked row attention). Every key seen comes before
  the query in raster order, so decoding goes by whole leading slices with a KV cache (``x.q_offset`` counts
  tokens: whole slices; every call of one sequence must use the same ``spatial_shape[1:]``).
- An axis on which a query sees no key (all padded) contributes 0 to the mean; so does a query seeing nothing.

The ``per_axis`` path moves each axis in turn to the sequence position and runs one batched SDPA over all lines
along it: O(T · (h + w [+ d]) · D) time, memory O(T) beyond the inputs, never a T x T tensor.
"""

from __future__ import annotations

import math

import torch

from ..errors import ShapeError
from ..inputs import AttentionInputs
from ..mechanism import Complexity, Mechanism, Paper, Shape, fast_path, register_mechanism
from ..ops.masking import masked_softmax, visibility
from ..ops.reference import compute_dtype, upcast_qkv
from ..ops.sdpa import sdpa
from ..ops.spatial import call_grid, to_grid
from ..patterns import MaskPredicate, Pattern
from ..state import KVCache


def _coord(idx: torch.Tensor, shape: tuple[int, ...], axis: int) -> torch.Tensor:
    """Coordinate on ``axis`` of row-major token index ``idx``."""
    return (idx // math.prod(shape[axis + 1 :])) % shape[axis]


def _line(shape: tuple[int, ...], axis: int, causal: bool) -> MaskPredicate:
    """Keys on the query's line along ``axis`` (all other coordinates equal); causal: not after the query."""

    def pred(b, h, q_idx, kv_idx):
        seen = kv_idx >= 0
        for other in range(len(shape)):
            if other != axis:
                seen = seen & (_coord(q_idx, shape, other) == _coord(kv_idx, shape, other))
        if causal:
            seen = seen & (_coord(kv_idx, shape, axis) <= _coord(q_idx, shape, axis))
        return seen

    return pred


def _along(t: torch.Tensor, dims: int, axis: int) -> torch.Tensor:
    """``[B, *grid, *rest] -> [B * lines, size along axis, *rest]``: one row per line along ``axis``."""
    moved = t.movedim(1 + axis, dims)  # the axis becomes the last grid axis
    return moved.reshape(-1, moved.shape[dims], *moved.shape[dims + 1 :])


@register_mechanism("axial")
class Axial(Mechanism):
    family = "spatial"
    paper = Paper("Axial Attention in Multidimensional Transformers", 2019, "1912.12180")
    patterns = frozenset({Pattern.NONCAUSAL_SELF, Pattern.CAUSAL_SELF})
    exact = False  # the mean of per-axis softmax attentions, not softmax over the grid
    spatial = True
    spatial_dims = (2, 3)
    state_kind = KVCache
    complexity = Complexity(time="O(T·(h+w)·D)", memory="O(T)")

    def check_call(self, x: AttentionInputs) -> None:
        super().check_call(x)
        shape = x.spatial_shape
        if len(shape) not in self.spatial_dims:
            raise ShapeError(f"axial takes grids of {self.spatial_dims} axes (rows, columns[, depth]); got {shape}")

    def _key_grid(self, x: AttentionInputs) -> tuple[tuple[int, ...], int]:
        """The grid of the keys (the cached slices included) and how many leading slices the cache holds."""
        shape = x.spatial_shape
        per_slice = math.prod(shape[1:])
        if x.q_offset % per_slice or x.tk % per_slice:
            raise ShapeError(
                f"axial: the cache holds {x.q_offset} tokens, not whole slices of {per_slice} tokens for spatial_shape "
                f"{shape}; every call of one sequence needs the same spatial_shape[1:]"
            )
        return (x.tk // per_slice, *shape[1:]), x.q_offset // per_slice

    def reference(self, x: AttentionInputs):
        kshape, _ = self._key_grid(x)
        causal = x.pattern is Pattern.CAUSAL_SELF
        q, k, v = upcast_qkv(x)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * x.scale  # [B, H, Tq, Tk]
        out = 0
        for axis in range(len(kshape)):
            probs = masked_softmax(scores, visibility(x, _line(kshape, axis, causal)))  # [B, H, Tq, Tk]
            out = out + torch.einsum("bhqk,bkhd->bqhd", probs, v)  # [B, Tq, H, Dv]
        return (out / len(kshape)).to(x.q.dtype), None

    @fast_path("per_axis", priority=10)
    def per_axis(self, x: AttentionInputs):
        kshape, before = self._key_grid(x)
        shape, dims, b = x.spatial_shape, len(kshape), x.batch
        causal = x.pattern is Pattern.CAUSAL_SELF
        q = to_grid(x.q, shape)  # [B, *S, Hq, Dk]
        k, v = to_grid(x.k, kshape), to_grid(x.v, kshape)  # [B, *S', Hkv, D] (S' counts the cached slices)
        valid = None if x.key_padding_mask is None else x.key_padding_mask.view(b, *kshape)  # [B, *S']
        acc = compute_dtype(x.q.dtype)  # the per-axis outputs add up in fp32 (fp64 stays fp64)
        total = torch.zeros((*x.q.shape[:3], x.v.shape[-1]), dtype=acc, device=x.q.device)  # [B, Tq, Hq, Dv]
        for axis in range(dims):
            # along the leading axis the keys are every slice; along the others, the query's own slices
            sl = slice(None) if axis == 0 else slice(before, None)
            kl, vl = _along(k[:, sl], dims, axis), _along(v[:, sl], dims, axis)  # [N, Lk, Hkv, D]
            vis = None if valid is None else _along(valid[:, sl], dims, axis)  # [N, Lk]
            out = self._lines(_along(q, dims, axis), kl, vl, vis, x.scale, causal, before if axis == 0 else 0)
            lines = q.movedim(1 + axis, dims).shape[: dims + 1]  # [B, other axes..., size along axis]
            out = out.view(*lines, *out.shape[-2:]).movedim(dims, 1 + axis)  # [B, *S, Hq, Dv]
            total = total + out.reshape(total.shape).to(acc)
        return (total / dims).to(x.q.dtype), None

    @staticmethod
    def _lines(q, k, v, valid, scale: float, causal: bool, offset: int) -> torch.Tensor:
        """Softmax attention within each line: ``q [N, Lq, Hq, D]``, keys ``[N, Lk, Hkv, D]`` -> ``[N, Lq, Hq, Dv]``.

        Query r of a line sits at key position r + offset; causal: it sees keys up to there."""
        mask = None
        if causal:
            r = torch.arange(q.shape[1], device=q.device)[:, None] + offset
            mask = (torch.arange(k.shape[1], device=q.device)[None, :] <= r)[None, None]  # [1, 1, Lq, Lk]
        if valid is not None:
            mask = valid[:, None, None, :] if mask is None else mask & valid[:, None, None, :]  # [N, 1, Lq|1, Lk]
        if mask is None:
            return sdpa(q, k, v, scale=scale)
        mask = mask.expand(-1, -1, q.shape[1], -1)
        seen = mask.any(-1, keepdim=True)  # [N|1, 1, Lq, 1]
        # a row that sees no key attends to all (finite, no NaN in any gradient), then is set to 0
        out = sdpa(q, k, v, scale=scale, mask=mask | ~seen)  # [N, Lq, Hq, Dv]
        return torch.where(seen.transpose(1, 2), out, torch.zeros((), dtype=out.dtype, device=out.device))

    def flops(self, shape: Shape, pattern: Pattern) -> float:
        # keys per query: its line along every axis of the call's grid (else a square 2-D one), about half of
        # each when causal
        sides = call_grid(shape.grid, shape.tq)
        keys = sum(sides) if pattern is Pattern.NONCAUSAL_SELF else sum((n + 1) / 2 for n in sides)
        return 2.0 * shape.batch * shape.heads * shape.tq * keys * (shape.dk + shape.dv)
