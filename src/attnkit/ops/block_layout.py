"""Block-sparse softmax attention over a layout of tiles, built from a mask predicate.

Rows (queries) and columns (keys) are laid out in *tiles* of ``block`` entries. A :class:`Tiling` says which
query row and which key sits in each tile slot (identity order for block_sparse, tokens sorted by residue
for dilated), with filler slots where a tile is not full. A :class:`TileLayout` lists, for each
(head, query tile), the key tiles holding at least one visible (query, key) pair (a padded index tensor
plus counts) and which of them are *partial* (some pairs hidden), where the mask predicate
``pred(b, h, q_idx, kv_idx)`` must be evaluated.

The layout comes from a *tile rule*: a function of the position ranges ``[lo, hi]`` that each tile spans
(``rule(h, q_lo, q_hi, kv_lo, kv_hi) -> (maybe_any, surely_all)``), O(nq·nk) work instead of O(Tq·Tk).
A rule may over-approximate ``maybe_any`` (costing only work) but ``surely_all`` must hold for every pair
of the tile pair, since full tiles skip the predicate. Without a rule, :func:`layout_from_predicate`
evaluates the predicate densely, in row chunks of bounded memory (O(Tq·Tk) time; tests and fallback).

:func:`block_sparse_attention` gathers each query tile's key tiles, evaluates the predicate only on its
partial tiles (on the gathered positions), and runs one softmax per query over exactly the visible keys
(fused SDPA, fp32 accumulation). Query tiles are bucketed by how many key tiles they visit (powers of two)
and processed in chunks of bounded size, so no ``[Tq, Tk]`` tensor is ever made and the gathered copies
stay within a fixed budget. Layouts are batch independent (the predicate gets ``b = 0``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..patterns import MaskPredicate

# (h [Hl,1,1], q_lo [1,nq,1], q_hi, kv_lo [1,1,nk], kv_hi) -> (maybe_any, surely_all), each [Hl|1, nq, nk]
TileRule = Callable[..., tuple[torch.Tensor, torch.Tensor]]

GATHER_BUDGET = 1 << 23  # elements of gathered keys (or values) per chunk of query tiles (32 MiB in fp32)
_FAR = 1 << 40  # span of a tile without any real entry: far from every position


@dataclass(frozen=True)
class Tiling:
    """Which query row / key sits in each tile slot; -1 marks a filler slot."""

    block: int
    q_src: torch.Tensor  # [nq * block] long: row of q in each slot
    kv_src: torch.Tensor  # [nk * block] long: row of k, v in each slot
    q_offset: int  # query row i sits at key position i + q_offset

    @property
    def nq(self) -> int:
        return self.q_src.numel() // self.block

    @property
    def nk(self) -> int:
        return self.kv_src.numel() // self.block

    def q_positions(self) -> torch.Tensor:
        """``[nq, block]`` key-coordinate position of each query slot (fillers: -1)."""
        pos = torch.where(self.q_src >= 0, self.q_src + self.q_offset, -1)
        return pos.view(self.nq, self.block)

    def kv_positions(self) -> torch.Tensor:
        """``[nk, block]`` position of each key slot (fillers: -1)."""
        return self.kv_src.view(self.nk, self.block)


def identity_tiling(tq: int, tk: int, block: int, q_offset: int, device=None) -> Tiling:
    """Tokens in order; query tiles aligned to key blocks (tile n covers key positions of one block)."""
    lead = q_offset % block  # filler rows before the first query, so that tiles align with key blocks
    nq = -(-(lead + tq) // block)
    rows = torch.arange(nq * block, device=device) - lead
    q_src = torch.where((rows >= 0) & (rows < tq), rows, -1)
    nk = -(-tk // block)
    cols = torch.arange(nk * block, device=device)
    kv_src = torch.where(cols < tk, cols, -1)
    return Tiling(block, q_src, kv_src, q_offset)


def residue_tiling(tq: int, tk: int, block: int, q_offset: int, modulus: int, device=None) -> Tiling:
    """Tokens sorted by position mod ``modulus``, each residue class (shard) padded to whole tiles.

    Every tile then holds positions of one residue, spaced ``modulus`` apart (an arithmetic progression).
    """

    def shards(first: int, count: int) -> torch.Tensor:
        pos = torch.arange(first, first + count, device=device)  # key-coordinate positions
        res = pos % modulus
        rank = (pos - first - (res - first) % modulus) // modulus  # index of a position within its shard
        longest = -(-count // modulus)  # tokens in the fullest shard
        per = -(-longest // block) * block  # slots per shard, in whole tiles
        src = torch.full((modulus, per), -1, dtype=torch.long, device=device)
        src[res, rank] = pos - first
        return src.reshape(-1)

    q_src = shards(q_offset, tq)
    kv_src = shards(0, tk)
    return Tiling(block, q_src, kv_src, q_offset)


def tile_spans(pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``pos [n, block]`` (-1 fillers) -> (lo, hi) ``[n]``: the smallest and largest real position per tile."""
    real = pos >= 0
    lo = torch.where(real, pos, _FAR).amin(-1)
    hi = torch.where(real, pos, -_FAR).amax(-1)
    return lo, hi


@dataclass(frozen=True)
class TileLayout:
    """For each (head, query tile): the key tiles it visits, padded with the sentinel tile ``nk``."""

    kv_index: torch.Tensor  # [Hl, nq, S] long, valid entries first, then the sentinel nk
    kv_count: torch.Tensor  # [Hl, nq] long: how many entries of kv_index are real
    partial: torch.Tensor  # [Hl, nq, S] bool: the predicate must be evaluated in that tile pair

    @property
    def heads(self) -> int:
        return self.kv_index.shape[0]

    def visited_pairs(self, block: int) -> int:
        """Query-slot x key-slot pairs the attention computes (for FLOP and memory estimates)."""
        return int(self.kv_count.sum()) * block * block


def select_tiles(maybe_any: torch.Tensor, surely_all: torch.Tensor) -> TileLayout:
    """``[Hl, nq, nk]`` tile masks -> the padded list of visited tiles per (head, query tile)."""
    hl, nq, nk = maybe_any.shape
    count = maybe_any.sum(-1)  # [Hl, nq]
    width = max(1, int(count.max().item())) if count.numel() else 1
    order = torch.argsort((~maybe_any).to(torch.int8), dim=-1, stable=True)[..., :width]  # visited first
    used = torch.arange(width, device=maybe_any.device) < count[..., None]  # [Hl, nq, S]
    kv_index = torch.where(used, order, nk)
    partial = used & ~surely_all.gather(-1, order)
    return TileLayout(kv_index, count, partial)


def layout_from_rule(rule: TileRule, tiling: Tiling, heads: int) -> TileLayout:
    """The layout from a tile rule on the tiles' position spans: O(nq·nk) work."""
    q_lo, q_hi = tile_spans(tiling.q_positions())
    kv_lo, kv_hi = tile_spans(tiling.kv_positions())
    device = q_lo.device
    h = torch.arange(heads, device=device).view(-1, 1, 1)
    maybe_any, surely_all = rule(
        h, q_lo.view(1, -1, 1), q_hi.view(1, -1, 1), kv_lo.view(1, 1, -1), kv_hi.view(1, 1, -1)
    )
    shape = torch.broadcast_shapes(maybe_any.shape, surely_all.shape, (1, tiling.nq, tiling.nk))
    empty = (q_lo > q_hi).view(1, -1, 1) | (kv_lo > kv_hi).view(1, 1, -1)  # tiles of fillers only
    maybe_any = maybe_any.expand(shape) & ~empty
    return select_tiles(maybe_any, surely_all.expand(shape) & maybe_any)


def layout_from_predicate(pred: MaskPredicate, tiling: Tiling, heads: int, *, chunk_rows: int = 1 << 12) -> TileLayout:
    """The exact layout from the predicate evaluated on every (query slot, key slot): O(Tq·Tk) time,
    O(chunk_rows·Tk) memory. For predicates without a tile rule, and to check rules in tests."""
    qpos, kvpos = tiling.q_positions(), tiling.kv_positions().reshape(-1)  # [nq, block], [nk*block]
    b = torch.zeros((), dtype=torch.long, device=qpos.device)
    h = torch.arange(heads, device=qpos.device).view(-1, 1, 1)
    anys, alls = [], []
    tiles_per_chunk = max(1, chunk_rows // tiling.block)
    for start in range(0, tiling.nq, tiles_per_chunk):
        rows = qpos[start : start + tiles_per_chunk].reshape(-1)  # [R]
        m = torch.as_tensor(pred(b, h, rows.view(1, -1, 1), kvpos.view(1, 1, -1)))  # [Hl|1, R, nk*block]
        m = m.expand(m.shape[0], rows.numel(), kvpos.numel())
        m = m & (kvpos >= 0) & (rows >= 0)[:, None]  # fillers are never visited
        t = m.view(m.shape[0], -1, tiling.block, tiling.nk, tiling.block)  # [Hl, n, block, nk, block]
        anys.append(t.any(4).any(2))
        real = (kvpos >= 0).view(1, 1, 1, tiling.nk, tiling.block) & (rows >= 0).view(1, -1, tiling.block, 1, 1)
        alls.append((t | ~real).all(4).all(2))
    maybe_any, surely_all = torch.cat(anys, 1), torch.cat(alls, 1)
    return select_tiles(maybe_any, surely_all & maybe_any)


class LayoutCache:
    """A small LRU cache of layouts by key (the predicate's parameters, lengths, offset, heads, device)."""

    def __init__(self, size: int = 16):
        self.size = size
        self._items: OrderedDict[Hashable, object] = OrderedDict()

    def get(self, key: Hashable, make: Callable[[], object]) -> object:
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        value = make()
        self._items[key] = value
        while len(self._items) > self.size:
            self._items.popitem(last=False)
        return value

    def clear(self) -> None:
        self._items.clear()


# ---- the attention ---------------------------------------------------------------------------------


def _tiles(t: torch.Tensor, src: torch.Tensor, block: int) -> torch.Tensor:
    """``t [B, T, H, D]`` -> ``[B, H * (n + 1), block * D]`` (contiguous): the tiles of each head in tile order,
    then an all-zero sentinel tile (index n). Filler slots are zero rows, selected (never multiplied)."""
    b, _, h, d = t.shape
    padded = F.pad(t, (0, 0, 0, 0, 0, 1))  # row T is zero
    idx = torch.where(src >= 0, src, t.shape[1])
    idx = torch.cat([idx, idx.new_full((block,), t.shape[1])])  # the sentinel tile
    tiles = padded[:, idx].view(b, -1, block, h, d).permute(0, 3, 1, 2, 4)  # [B, H, n+1, block, D]
    return tiles.reshape(b, -1, block * d)


def _key_valid(tiling: Tiling, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
    """``[B|1, nk + 1, block]`` bool: slots holding a real (not filler, not padded) key."""
    src = torch.cat([tiling.kv_src, tiling.kv_src.new_full((tiling.block,), -1)])
    real = src >= 0
    if key_padding_mask is not None:
        real = real & key_padding_mask[:, src.clamp(min=0)]
    else:
        real = real[None]
    return real.view(real.shape[0], -1, tiling.block)


def _chunks(layout: TileLayout, block: int, heads: int, dim: int, batch: int) -> list[tuple[torch.Tensor, int]]:
    """(query tile ids, slots S) to process together: tiles grouped by how many key tiles they visit (the most
    over heads), so no slot is padding where the heads agree, each group cut to the gather budget."""
    count = layout.kv_count.amax(0)  # [nq]
    out = []
    for c in torch.unique(count).tolist():
        if c == 0:
            continue  # tiles that see nothing stay zero
        tiles = torch.nonzero(count == c).view(-1)
        per_chunk = max(1, GATHER_BUDGET // (batch * heads * c * block * dim))
        out.extend((tiles[i : i + per_chunk], c) for i in range(0, tiles.numel(), per_chunk))
    return out


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    tiling: Tiling,
    layout: TileLayout,
    pred: MaskPredicate | None,
    scale: float,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``q [B,Tq,Hq,D], k [B,Tk,Hkv,D], v [B,Tk,Hkv,Dv] -> [B,Tq,Hq,Dv]``: softmax over the keys of the visited
    tiles that are real, not padded, and (in partial tiles) allowed by ``pred``; rows seeing none are 0.

    A head-dependent layout (``layout.heads == Hq``) repeats k, v to the query heads; a shared one keeps GQA.
    """
    bsz, tq, hq, dk = q.shape
    hkv, dv, blk, nq, nk = k.shape[2], v.shape[3], tiling.block, tiling.nq, tiling.nk
    if layout.heads > 1 and hkv != hq:
        k, v = k.repeat_interleave(hq // hkv, dim=2), v.repeat_interleave(hq // hkv, dim=2)
    hk = k.shape[2]
    qt = _tiles(q, tiling.q_src, blk).view(bsz, hq, nq + 1, blk, dk)[:, :, :nq].transpose(1, 2).contiguous()
    kt, vt = _tiles(k, tiling.kv_src, blk), _tiles(v, tiling.kv_src, blk)  # [B, Hk * (nk+1), block * D]
    valid = _key_valid(tiling, key_padding_mask)  # [B|1, nk+1, block]
    qpos, kvpos = tiling.q_positions(), tiling.kv_positions()
    kvpos = torch.cat([kvpos, kvpos.new_full((1, blk), -1)])  # [nk+1, block]
    hsel = torch.arange(hk, device=q.device).view(1, -1, 1)  # [1, Hk, 1]

    out = q.new_zeros(bsz, nq, hq, blk, dv)  # [B, nq, Hq, block, Dv]: tile order
    for tiles, slots in _chunks(layout, blk, max(hq, hk), max(dk, dv), bsz):
        g = tiles.numel()
        idx = layout.kv_index[:, tiles, :slots].transpose(0, 1)  # [G, Hl, S]
        flat = (hsel * (nk + 1) + idx).reshape(-1)  # [G * Hk * S]: rows of kt / vt, already in SDPA order
        kg = kt.index_select(1, flat).view(bsz * g, hk, slots * blk, dk)  # [B*G, Hk, L, D]
        vg = vt.index_select(1, flat).view(bsz * g, hk, slots * blk, dv)
        mask = valid[:, idx].view(valid.shape[0], g, idx.shape[1], 1, slots * blk)  # [B|1, G, Hl, 1, L]
        part = layout.partial[:, tiles, :slots].transpose(0, 1)  # [G, Hl, S]
        if bool(part.any()):
            mask = mask & _partial_mask(pred, part, idx, qpos[tiles], kvpos, blk)
        elif bool(mask.all()):
            mask = None  # every visited key visible: the fused kernel's fastest case
        qg = qt[:, tiles].view(bsz * g, hq, blk, dk)  # [B*G, Hq, block, D]
        out[:, tiles] = _attend(qg, kg, vg, mask, scale).view(bsz, g, hq, blk, dv)
    out = out.transpose(2, 3).reshape(bsz, nq * blk, hq, dv)  # [B, nq*block, Hq, Dv] in slot order
    slot_of_row = torch.empty(tq, dtype=torch.long, device=q.device)
    real = tiling.q_src >= 0
    slot_of_row[tiling.q_src[real]] = torch.nonzero(real).view(-1)
    return out[:, slot_of_row]


def _partial_mask(
    pred: MaskPredicate | None,
    part: torch.Tensor,
    idx: torch.Tensor,
    qpos: torch.Tensor,
    kvpos: torch.Tensor,
    blk: int,
) -> torch.Tensor:
    """``[1, G, Hl, block, L]`` bool: True except inside partial tile pairs, where the predicate decides
    (evaluated on the gathered positions of those pairs only). ``part``, ``idx``: ``[G, Hl, S]``."""
    if pred is None:
        raise ValueError("a layout with partial tiles needs the mask predicate")
    g, hl, s = part.shape
    keep = torch.ones(g, hl, s, blk, blk, dtype=torch.bool, device=part.device)  # [G, Hl, S, row, col]
    gg, hh, ss = torch.nonzero(part, as_tuple=True)  # the partial pairs
    rows = qpos[gg][:, :, None]  # [P, block, 1]
    cols = kvpos[idx[gg, hh, ss]][:, None, :]  # [P, 1, block]
    b = torch.zeros((), dtype=torch.long, device=part.device)
    keep[gg, hh, ss] = torch.as_tensor(pred(b, hh.view(-1, 1, 1), rows, cols)).expand(-1, blk, blk)
    return keep.permute(0, 1, 3, 2, 4).reshape(1, g, hl, blk, s * blk)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """One fused softmax per query tile: ``q [N, Hq, block, D]``, ``k, v [N, Hk, L, D]`` (N = B * G), mask
    ``[B|1, G, Hl, block|1, L]`` (or None) -> ``[N, Hq, block, Dv]``, rows seeing no key 0."""
    n, hq, blk, _ = q.shape
    m = None
    if mask is not None:  # a mask without partial tiles is one row for the whole tile: SDPA broadcasts it
        _, g, hl, rows, length = mask.shape
        m = mask.expand(n // g, g, hl, rows, length).reshape(n, hl, rows, length)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=scale, enable_gqa=hq != k.shape[1])
    if m is not None:
        o = torch.where(m.any(-1, keepdim=True), o, torch.zeros((), dtype=o.dtype, device=o.device))
    return o


def visible_pairs(pred: MaskPredicate, tiling: Tiling, layout: TileLayout) -> int:
    """Exact count of visible (real query, real key) pairs over all heads of the layout: full tiles count
    their real slots, partial ones evaluate the predicate (for FLOP counts; no padding mask)."""
    qreal = (tiling.q_positions() >= 0).sum(-1)  # [nq]
    kvpos = torch.cat([tiling.kv_positions(), tiling.kv_positions().new_full((1, tiling.block), -1)])
    kreal = (kvpos >= 0).sum(-1)  # [nk+1]
    used = layout.kv_index < tiling.nk
    full = used & ~layout.partial
    nq_idx = torch.arange(tiling.nq, device=kreal.device).view(1, -1, 1)
    total = int((qreal[nq_idx] * kreal[layout.kv_index] * full).sum())
    hh, gg, ss = torch.nonzero(layout.partial, as_tuple=True)
    for start in range(0, hh.numel(), 4096):  # bounded memory: P x block x block per step
        sl = slice(start, start + 4096)
        rows = tiling.q_positions()[gg[sl]][:, :, None]
        cols = kvpos[layout.kv_index[hh[sl], gg[sl], ss[sl]]][:, None, :]
        b = torch.zeros((), dtype=torch.long, device=rows.device)
        vis = torch.as_tensor(pred(b, hh[sl].view(-1, 1, 1), rows, cols)) & (rows >= 0) & (cols >= 0)
        total += int(vis.sum())
    return total
