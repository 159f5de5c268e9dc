"""Neighborhood attention in 1-D, 2-D and 3-D — Neighborhood Attention Transformer (Hassani et al., 2022,
arXiv:2204.07143); Dilated Neighborhood Attention Transformer (Hassani & Shi, 2022, arXiv:2209.15001);
Faster Neighborhood Attention (Hassani et al., 2024, arXiv:2403.04690) for the tiled path.

    out_i = sum_{j in N(i)} softmax_j(scale * q_i . k_j) v_j,   N(i) = N_0(i_0) x N_1(i_1) x ...  (a set per axis)
    on an axis with kernel k, dilation d, a query at i (group g = i mod d, i' = i // d, L_g keys in its group):
    N_a(i) = { (s + t) d + g : 0 <= t < k },  s = clamp(i' - k // 2, 0, L_g - k);  causal: { j' : i' - k < j' <= i' }

NATTEN's semantics: every query sees exactly prod(kernel_size) keys, the window shifted (not cropped) at the
borders, and with dilation the window lies within the query's dilation group; a causal axis sees the previous
``kernel_size`` positions of the group, itself included (fewer at the start). Choices where the papers and
NATTEN are silent or differ:

- An axis whose dilation group is shorter than ``kernel_size`` (NATTEN raises when kernel_size * dilation >
  the axis) is *clamped*: the window is the whole group on that axis. A grid no larger than the kernel is then
  plain softmax over each dilation group, and causal decoding by leading slices (a prefix of 1 row, then 2...)
  is defined; NATTEN itself has no such prefixes to handle.
- ``pattern="causal_self"`` makes the leading axis (rows, frames) causal whatever ``is_causal[0]`` says (that
  is what causal_self means on a grid here); the other axes follow ``is_causal``. ``noncausal_self`` applies
  ``is_causal`` as given, e.g. ``(False, True)`` is causal along the width only.
- ``kernel_size``, ``dilation`` and ``is_causal`` are one value for every axis or a tuple of one per axis; a
  tuple must have as many entries as the call's grid has axes (else ``ShapeError``).
- Decoding (KV cache) goes by whole leading slices: the cache length must be a multiple of the slice size.

The ``tiled`` path cuts the query grid into tiles (64 queries on 1-D, 8x8 on 2-D, 4x4x4 on 3-D) per dilation
group; each tile attends to its halo of ``tile + kernel - 1`` keys per axis (shifted inside the grid) in one
batched SDPA call with a small mask: O(T * prod(tile + kernel - 1)) time and memory, never T x T.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import InvalidOption, ShapeError
from ..inputs import AttentionInputs
from ..mechanism import Complexity, Mechanism, Paper, Shape, fast_path, register_mechanism
from ..ops.masking import masked_softmax
from ..ops.reference import upcast_qkv
from ..ops.sdpa import sdpa
from ..ops.spatial import call_grid, pad_grid
from ..options import check_int
from ..patterns import MaskPredicate, Pattern, dense_mask
from ..state import KVCache

RANKS = (1, 2, 3)
# query tile shape of the tiled path, per grid rank: about 64 queries a tile, whose halo stays small
TILE = {1: (64,), 2: (8, 8), 3: (4, 4, 4)}


def _as_tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


@dataclass(frozen=True)
class NeighborhoodOptions:
    kernel_size: int | tuple[int, ...] = 7  # keys per axis (odd), one int for every axis or one per axis
    dilation: int | tuple[int, ...] = 1  # stride between neighbours per axis (DiNAT); one int or one per axis
    is_causal: bool | tuple[bool, ...] = False  # per axis: see the previous kernel_size positions only

    def __post_init__(self):
        for name in ("kernel_size", "dilation", "is_causal"):
            object.__setattr__(self, name, _as_tuple(getattr(self, name)))
        lengths = set()
        for name in ("kernel_size", "dilation"):
            value = getattr(self, name)
            for v in value if isinstance(value, tuple) else (value,):
                check_int("neighborhood", name, v)
            if name == "kernel_size" and any(v % 2 == 0 for v in (value if isinstance(value, tuple) else (value,))):
                raise InvalidOption(f"neighborhood option kernel_size={value!r} is not valid; expected odd sizes")
            if isinstance(value, tuple):
                lengths.add(len(value))
        causal = self.is_causal
        if not isinstance(causal, bool) and not (
            isinstance(causal, tuple) and all(isinstance(c, bool) for c in causal)
        ):
            raise InvalidOption(
                f"neighborhood option is_causal={causal!r} is not valid; expected a bool or a tuple of bools"
            )
        if isinstance(causal, tuple):
            lengths.add(len(causal))
        if any(n not in RANKS for n in lengths) or len(lengths) > 1:
            raise InvalidOption(
                "neighborhood options kernel_size, dilation and is_causal given per axis must have one entry per"
                f" axis (1, 2 or 3), the same number each; got kernel_size={self.kernel_size!r},"
                f" dilation={self.dilation!r}, is_causal={self.is_causal!r}"
            )


@dataclass(frozen=True)
class Geometry:
    """One call's neighbourhoods: the key grid (a KV cache adds leading slices) and the per-axis settings."""

    grid: tuple[int, ...]  # key grid; queries are its last ``query_rows`` leading slices
    query_rows: int
    kernel: tuple[int, ...]
    dilation: tuple[int, ...]
    causal: tuple[bool, ...]

    @property
    def rank(self) -> int:
        return len(self.grid)

    def predicate(self) -> MaskPredicate:
        """``pred(b, h, q_idx, kv_idx)`` on row-major token positions of the key grid (tensor ops only)."""

        def pred(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
            seen = None
            stride = 1
            for axis in reversed(range(self.rank)):
                size = self.grid[axis]
                i, j = (q_idx // stride) % size, (kv_idx // stride) % size  # coordinates along this axis
                on_axis = axis_window(i, j, size, self.kernel[axis], self.dilation[axis], self.causal[axis])
                seen = on_axis if seen is None else seen & on_axis
                stride *= size
            return seen

        return pred


def axis_window(i: torch.Tensor, j: torch.Tensor, length: int, kernel: int, dilation: int, causal: bool):
    """Whether key coordinate ``j`` is in the neighbourhood of query coordinate ``i`` along one axis (broadcast)."""
    same_group = (i - j) % dilation == 0
    gi, gj = i // dilation, j // dilation  # positions within the dilation group
    if causal:
        return same_group & (gj <= gi) & (gj > gi - kernel)
    group_len = (length - i % dilation + dilation - 1) // dilation  # keys of the query's group on this axis
    start = torch.minimum((gi - kernel // 2).clamp(min=0), (group_len - kernel).clamp(min=0))  # shifted, not cut
    return same_group & (gj >= start) & (gj < start + kernel)


def axis_pairs(length: int, kernel: int, dilation: int, causal: bool) -> int:
    """Exact number of (query, key) pairs along one axis: the sum over positions of their window sizes."""
    total = 0
    for i in range(length):
        group_len = (length - i % dilation + dilation - 1) // dilation
        total += min(kernel, i // dilation + 1) if causal else min(kernel, group_len)
    return total


@register_mechanism("neighborhood")
class Neighborhood(Mechanism):
    family = "spatial"
    paper = Paper("Neighborhood Attention Transformer", 2022, "2204.07143")
    patterns = frozenset({Pattern.NONCAUSAL_SELF, Pattern.CAUSAL_SELF})
    exact = True
    spatial = True
    spatial_dims = RANKS
    state_kind = KVCache
    complexity = Complexity(time="O(T·k^d·D)", memory="O(T·k^d)")
    Options = NeighborhoodOptions
    example_options = ({"kernel_size": 3}, {"kernel_size": 5, "dilation": 2})
    fidelity_knob = ("kernel_size", (3, 7, 13))

    # ---- geometry -----------------------------------------------------------------------------------

    def _per_axis(self, name: str, rank: int) -> tuple:
        value = getattr(self.options, name)
        if not isinstance(value, tuple):
            return (value,) * rank
        if len(value) != rank:
            raise ShapeError(
                f"neighborhood option {name}={value!r} has {len(value)} entries but spatial_shape has {rank} axes"
            )
        return value

    def _check_rank(self, shape: tuple[int, ...]) -> None:
        if len(shape) not in RANKS:
            raise ShapeError(f"neighborhood takes 1-D, 2-D or 3-D grids; got spatial_shape {shape}")

    def geometry(self, x: AttentionInputs) -> Geometry:
        """The key grid and per-axis settings of a validated call (queries: the grid's last leading slices)."""
        shape = x.spatial_shape
        self._check_rank(shape)
        rank, row = len(shape), math.prod(shape[1:])
        causal = self._per_axis("is_causal", rank)
        if x.pattern is Pattern.CAUSAL_SELF:
            causal = (True, *causal[1:])  # causal_self on a grid: causal along the leading axis
        return Geometry(
            grid=(x.tk // row, *shape[1:]),
            query_rows=shape[0],
            kernel=self._per_axis("kernel_size", rank),
            dilation=self._per_axis("dilation", rank),
            causal=causal,
        )

    def check_call(self, x: AttentionInputs) -> None:
        super().check_call(x)
        self._check_rank(x.spatial_shape)
        for name in ("kernel_size", "dilation", "is_causal"):
            self._per_axis(name, len(x.spatial_shape))
        row = math.prod(x.spatial_shape[1:])
        if x.state is not None and x.state.offset % row:
            raise ShapeError(
                f"neighborhood decodes by whole leading slices of {row} tokens (spatial_shape {x.spatial_shape});"
                f" the state holds {x.state.offset} tokens, not a multiple of {row}"
            )

    # ---- reference ----------------------------------------------------------------------------------

    def reference(self, x: AttentionInputs):
        geo = self.geometry(x)
        q, k, v = upcast_qkv(x)  # [B, Tq, H, Dk], [B, Tk, H, Dk], [B, Tk, H, Dv]
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * x.scale  # [B, H, Tq, Tk]
        # the neighbourhood on the key grid (query i sits at key position i + q_offset), and the padding
        mask = dense_mask(geo.predicate(), x.tq, x.tk, q_offset=x.q_offset, device=x.q.device)  # [1, 1, Tq, Tk]
        if x.key_padding_mask is not None:
            mask = mask & x.key_padding_mask[:, None, None, :]  # [B, 1, Tq, Tk]
        probs = masked_softmax(scores, mask)  # rows that see no key are 0
        out = torch.einsum("bhqk,bkhd->bqhd", probs, v)  # [B, Tq, H, Dv]
        return out.to(x.q.dtype), None

    # ---- fast path ----------------------------------------------------------------------------------

    @fast_path("tiled", priority=10)
    def tiled(self, x: AttentionInputs):
        geo = self.geometry(x)
        return tiled_neighborhood(x, geo), None

    # ---- costs ----------------------------------------------------------------------------------------

    def pairs(self, spatial_shape: tuple[int, ...], pattern: Pattern) -> int:
        """Exact number of (query, key) pairs on a grid (the neighbourhood is a product of per-axis windows)."""
        self._check_rank(spatial_shape)
        rank = len(spatial_shape)
        causal = self._per_axis("is_causal", rank)
        if pattern is Pattern.CAUSAL_SELF:
            causal = (True, *causal[1:])
        kernel, dilation = self._per_axis("kernel_size", rank), self._per_axis("dilation", rank)
        return math.prod(axis_pairs(n, kernel[a], dilation[a], causal[a]) for a, n in enumerate(spatial_shape))

    def flops(self, shape: Shape, pattern: Pattern) -> float:
        # the pairs on the call's grid; without one, on the squarest grid of the rank the options give (else 2-D)
        options = (self.options.kernel_size, self.options.dilation, self.options.is_causal)
        ranks = {len(v) for v in options if isinstance(v, tuple)}
        grid = call_grid(shape.grid, shape.tq, ranks.pop() if ranks else 2)
        return 2.0 * shape.batch * shape.heads * self.pairs(grid, pattern) * (shape.dk + shape.dv)

    def mask_predicate(self, pattern: Pattern | str, spatial_shape: tuple[int, ...]) -> MaskPredicate:
        """The neighbourhood of a whole grid as a mask predicate on token positions (for FlexAttention)."""
        from ..patterns import as_pattern

        pattern = as_pattern(pattern)
        self._check_rank(tuple(spatial_shape))
        rank = len(spatial_shape)
        causal = self._per_axis("is_causal", rank)
        if pattern is Pattern.CAUSAL_SELF:
            causal = (True, *causal[1:])
        geo = Geometry(
            grid=tuple(spatial_shape),
            query_rows=spatial_shape[0],
            kernel=self._per_axis("kernel_size", rank),
            dilation=self._per_axis("dilation", rank),
            causal=causal,
        )
        return geo.predicate()


# ---- the tiled path -----------------------------------------------------------------------------------


def tiled_neighborhood(x: AttentionInputs, geo: Geometry) -> torch.Tensor:
    """``[B, Tq, Hq, Dv]``: each dilation group of the grid (a strided sub-grid) runs undilated tiles."""
    rank = geo.rank
    q_start = geo.grid[0] - geo.query_rows  # leading slice of the first query (a KV cache's slices before it)
    q = x.q.reshape(x.batch, geo.query_rows, *geo.grid[1:], *x.q.shape[-2:])  # [B, *Q, Hq, Dk]
    k = x.k.reshape(x.batch, *geo.grid, *x.k.shape[-2:])  # [B, *K, Hkv, Dk]
    v = x.v.reshape(x.batch, *geo.grid, *x.v.shape[-2:])  # [B, *K, Hkv, Dv]
    kpm = None if x.key_padding_mask is None else x.key_padding_mask.view(x.batch, *geo.grid)  # [B, *K]
    starts = (q_start,) + (0,) * (rank - 1)
    groups = list(itertools.product(*(range(d) for d in geo.dilation)))
    out = None if len(groups) == 1 else x.q.new_zeros(*q.shape[:-1], x.v.shape[-1])  # [B, *Q, Hq, Dv]
    for group in groups:
        # keys of the group: g, g + d, ...; its queries: local positions l with (start + l) % d == g
        first = [(g - s) % d for g, s, d in zip(group, starts, geo.dilation, strict=True)]
        key_sl = (slice(None), *(slice(g, None, d) for g, d in zip(group, geo.dilation, strict=True)))
        q_sl = (slice(None), *(slice(f, None, d) for f, d in zip(first, geo.dilation, strict=True)))
        kg, vg, qg = k[key_sl], v[key_sl], q[q_sl]
        if 0 in kg.shape[1 : 1 + rank] or 0 in qg.shape[1 : 1 + rank]:
            continue
        # the group's first query in the group's own coordinates
        q0 = [(s + f - g) // d for s, f, g, d in zip(starts, first, group, geo.dilation, strict=True)]
        mg = None if kpm is None else kpm[key_sl]
        og = _tiles(qg, kg, vg, mg, q0, geo.kernel, geo.causal, x.scale)  # [B, *Qg, Hq, Dv]
        if out is None:
            out = og
        else:
            out[q_sl] = og
    return out.reshape(x.batch, x.tq, x.heads, x.v.shape[-1])


def _tiles(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kpm: torch.Tensor | None,
    q0: list[int],
    kernel: tuple[int, ...],
    causal: tuple[bool, ...],
    scale: float,
) -> torch.Tensor:
    """Undilated neighbourhood attention of a query box (first query at ``q0`` on the key grid) in tiles.

    ``q [B, *Q, Hq, Dk]``, ``k [B, *K, Hkv, Dk]``, ``v [B, *K, Hkv, Dv]``, ``kpm [B, *K]`` -> ``[B, *Q, Hq, Dv]``.
    """
    b, rank = q.shape[0], len(kernel)
    qshape, kshape = q.shape[1 : 1 + rank], k.shape[1 : 1 + rank]
    tile = [min(t, n) for t, n in zip(TILE[rank], qshape, strict=True)]
    ntiles = [-(-n // t) for n, t in zip(qshape, tile, strict=True)]
    halo = [min(t + kw - 1, n) for t, kw, n in zip(tile, kernel, kshape, strict=True)]
    dev = q.device

    # per axis: query coordinates [nt, t], halo key coordinates [nt, H], and the window between them [nt, t, H]
    key_idx, masks = [], []
    for a in range(rank):
        first = q0[a] + torch.arange(ntiles[a], device=dev) * tile[a]  # first query of each tile
        lowest = first - (kernel[a] - 1 if causal[a] else kernel[a] // 2)  # the lowest key it may need
        start = lowest.clamp(min=0, max=kshape[a] - halo[a])  # the halo, shifted inside the grid
        keys = start[:, None] + torch.arange(halo[a], device=dev)  # [nt, H]
        queries = first[:, None] + torch.arange(tile[a], device=dev)  # [nt, t]
        key_idx.append(keys)
        masks.append(axis_window(queries[:, :, None], keys[:, None, :], kshape[a], kernel[a], 1, causal[a]))

    def place(t: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
        # a per-axis tensor of `len(dims)` axes viewed at positions `dims` of a (len(dims) * rank)-axis shape
        shape = [1] * (len(dims) * rank)
        for d, n in zip(dims, t.shape, strict=True):
            shape[d] = n
        return t.reshape(shape)

    # the window of every tile: [nt_0.., t_0.., H_0..] -> [NT, TT, HH]
    window = masks[0].new_ones(())
    for a, m in enumerate(masks):
        window = window & place(m, (a, rank + a, 2 * rank + a))
    nt, tt, hh = math.prod(ntiles), math.prod(tile), math.prod(halo)
    window = window.reshape(nt, tt, hh)

    # halo keys of every tile, gathered by flat key index (index_select: its backward is an index_add, much
    # faster than advanced indexing's accumulating index_put): [B, NT * HH, Hkv, D] -> [B * NT, HH, Hkv, D]
    flat = sum(place(key_idx[a], (a, rank + a)) * math.prod(kshape[a + 1 :]) for a in range(rank)).reshape(-1)
    kt = k.reshape(b, -1, *k.shape[-2:]).index_select(1, flat).reshape(b * nt, hh, *k.shape[-2:])
    vt = v.reshape(b, -1, *v.shape[-2:]).index_select(1, flat).reshape(b * nt, hh, *v.shape[-2:])
    mask = window[None]  # [1, NT, TT, HH]
    if kpm is not None:
        mask = mask & kpm.reshape(b, -1).index_select(1, flat).reshape(b, nt, 1, hh)  # [B, NT, TT, HH]
    mask = mask.expand(b, nt, tt, hh).reshape(b * nt, 1, tt, hh)

    # queries in tiles: [B, *Q, Hq, D] padded -> [B, nt_0, t_0, nt_1, t_1, .., Hq, D] -> [B * NT, TT, Hq, D]
    qp, _ = pad_grid(q, tuple(tile))
    split = [n for pair in zip(ntiles, tile, strict=True) for n in pair]
    to_tiles = [0, *(1 + 2 * a for a in range(rank)), *(2 + 2 * a for a in range(rank)), 2 * rank + 1, 2 * rank + 2]
    qt = qp.reshape(b, *split, *q.shape[-2:]).permute(to_tiles).reshape(b * nt, tt, *q.shape[-2:])

    out = sdpa(qt, kt, vt, scale=scale, mask=mask)  # [B * NT, TT, Hq, Dv]
    seen = mask.any(-1).view(b * nt, tt, 1, 1)  # queries with at least one visible key
    out = torch.where(seen, out, torch.zeros((), dtype=out.dtype, device=out.device))

    # back to the grid: [B, nt.., t.., Hq, Dv] -> [B, nt_0, t_0, ..] -> [B, *Q padded] -> [B, *Q]
    back = [0, *(i for a in range(rank) for i in (1 + a, 1 + rank + a)), 2 * rank + 1, 2 * rank + 2]
    out = out.reshape(b, *ntiles, *tile, *out.shape[-2:]).permute(back)
    out = out.reshape(b, *(n * t for n, t in zip(ntiles, tile, strict=True)), *out.shape[-2:])
    return out[(slice(None), *(slice(0, n) for n in qshape))]
