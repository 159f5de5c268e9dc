"""Exact softmax over selected keys: top-k selection with one tie rule, rank coordinates, and two gathers.

Estimated/routed sparse mechanisms (sea, bilevel_routing, dynamic_mask) choose, per query, a small set of
keys or key blocks and then run exact softmax attention over that set. This module holds the shared pieces:

- :func:`order_key` and :func:`select_top`: top-k with a total order (score, then position; a later position
  wins a tie), so every path that asks the same question gets the same keys whatever ``torch.topk`` does
  with ties. Selection is not differentiable (indices); gradients flow through q, k, v and any bias.
- :class:`RankLayout`: block/region structure counted over *real* (unpadded) keys, so key padding does not
  move block boundaries; fast paths work on keys compacted into rank order.
- :func:`shared_candidate_attention`: every query of a query block scores one shared candidate list of keys
  (one gather per block), masked per query. Memory O(T·C·D/block + T·C).
- :func:`routed_block_attention`: each query has its own list of key blocks. Pairs (query, block) are sorted
  by block so that each block's keys are read once per tile of queries (a grouped matmul), partial softmax
  statistics are merged per query. Memory O(T·m·(D + block)), never [T, T].

Everything is computed in fp32 (fp64 for fp64 inputs); padded, duplicate and out-of-range slots are masked
by selection (``torch.where``), so a query with nothing visible gets 0, never NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..inputs import AttentionInputs
from .gqa import repeat_kv
from .masking import masked_softmax
from .reference import compute_dtype

NEVER = torch.iinfo(torch.int64).min  # order key of a slot that must not be selected


def order_key(scores: torch.Tensor, positions: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """int64 keys ordering candidates by ``scores`` (fp32, higher first), then by position (later first).

    The fp32 bit pattern is mapped to a monotone integer, shifted left by 32 bits, and the position is
    added: a strict total order, so top-k has no ties. ``allowed`` False gives ``NEVER``.
    """
    bits = scores.detach().to(torch.float32).contiguous().view(torch.int32).to(torch.int64)
    mono = torch.where(bits < 0, -(bits & 0x7FFFFFFF) - 1, bits)  # monotone in the float value
    key = mono * (1 << 32) + positions.to(torch.int64)
    if allowed is not None:
        key = torch.where(allowed, key, torch.full_like(key, NEVER))
    return key


def select_top(keys: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest order keys along the last axis: (indices, valid); fewer allowed ones give invalid slots."""
    k = min(k, keys.shape[-1])
    top, idx = torch.topk(keys, k, dim=-1)
    return idx, top != NEVER


def first_valid_occurrence(idx: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``valid`` without repeats: True where a valid slot's index occurs in no earlier valid slot of its row."""
    spare = -1 - torch.arange(idx.shape[-1], device=idx.device)  # distinct negatives for invalid slots
    idx = torch.where(valid, idx, spare)
    srt, perm = torch.sort(idx, dim=-1, stable=True)
    first = torch.ones_like(srt, dtype=torch.bool)
    first[..., 1:] = srt[..., 1:] != srt[..., :-1]
    return valid & torch.empty_like(first).scatter_(-1, perm, first)


# ---- rank coordinates (blocks counted over real keys) ------------------------------------------------------


@dataclass(frozen=True)
class RankLayout:
    """Where each key and query sits once padded keys are taken out (self patterns).

    ``key_rank [B|1, Tk]``: rank of each key among the real keys of its row (-1: padding).
    ``q_rank [B|1, Tq]``: rank of the last real key at or before each query (-1: none); for a real query its
    own rank. ``order [B, Tk]``: the key index at each rank (real keys first, in order), None when no key is
    padded. ``n_real [B]``: real keys per row (None: all). ``q_real [B, Tq]``: whether each query is real.
    """

    key_rank: torch.Tensor
    q_rank: torch.Tensor
    order: torch.Tensor | None
    n_real: torch.Tensor | None
    q_real: torch.Tensor | None

    def compact(self, t: torch.Tensor) -> torch.Tensor:
        """``t [B, Tk, H, D]`` with its keys in rank order (padded rows, zeros, last)."""
        if self.order is None:
            return t
        return t.gather(1, self.order[:, :, None, None].expand_as(t))

    def restore(self, t: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`compact` for a ``[B, T, H, D]`` tensor of queries in rank order (self patterns)."""
        if self.order is None:
            return t
        return torch.empty_like(t).scatter(1, self.order[:, :, None, None].expand_as(t), t)

    def real_ranks(self, tk: int, device) -> torch.Tensor:
        """Bool ``[B|1, Tk]``: rank slot r holds a real key."""
        ranks = torch.arange(tk, device=device)[None]  # [1, Tk]
        return torch.ones_like(ranks, dtype=torch.bool) if self.n_real is None else ranks < self.n_real[:, None]


def rank_layout(x: AttentionInputs) -> RankLayout:
    """The rank coordinates of a self-pattern call (query i sits at key position i + q_offset)."""
    device = x.k.device
    pos = torch.arange(x.tq, device=device) + x.q_offset  # key position of each query
    kpm = x.key_padding_mask
    if kpm is None:
        return RankLayout(torch.arange(x.tk, device=device)[None], pos[None], None, None, None)
    real_so_far = kpm.long().cumsum(1)  # [B, Tk]
    key_rank = torch.where(kpm, real_so_far - 1, -1)
    order = torch.sort((~kpm).to(torch.int8), dim=1, stable=True).indices  # real keys first, in order
    return RankLayout(key_rank, real_so_far[:, pos] - 1, order, kpm.sum(1), kpm[:, pos])


def block_reduce(
    t: torch.Tensor, real: torch.Tensor, block_size: int, *, mean: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum (or mean) of the real rows of each block: ``t [B, H, T, D]`` in rank order, ``real [B|1, T]`` ->
    ``([B, H, nb, D], counts [B|1, 1, nb])``; a block without real rows gives 0."""
    nb = -(-t.shape[2] // block_size)
    pad = nb * block_size - t.shape[2]
    t = torch.where(real[:, None, :, None], t, 0.0)
    sums = torch.nn.functional.pad(t, (0, 0, 0, pad)).unflatten(2, (nb, block_size)).sum(3)
    counts = torch.nn.functional.pad(real, (0, pad)).unflatten(1, (nb, block_size)).sum(2)[:, None]
    if mean:
        sums = sums / counts.clamp_min(1)[..., None]
    return sums, counts


def selected_block_mask(blocks: torch.Tensor, valid: torch.Tensor, key_block: torch.Tensor, nb: int) -> torch.Tensor:
    """Dense bool ``[B, H, Tq, Tk]``: key j is in one of the query's valid selected blocks (for references).

    ``blocks, valid [B, H, Tq, m]``; ``key_block [B|1, Tk]`` the block of each key (-1: none).
    """
    b, h, tq, _ = blocks.shape
    per_block = torch.zeros(b, h, tq, nb + 1, dtype=torch.bool, device=blocks.device)
    per_block.scatter_(-1, torch.where(valid, blocks, nb), True)  # invalid slots land in the spare column
    kb = torch.where(key_block >= 0, key_block, nb)  # keys in no block read the spare column...
    per_block[..., nb] = False  # ...which is False
    return per_block.gather(-1, kb[:, None, None, :].expand(b, h, tq, -1))


# ---- attention over a shared candidate list per query block -----------------------------------------------


def shared_candidate_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cand: torch.Tensor,
    allowed: torch.Tensor,
    *,
    scale: float,
    query_block: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Exact softmax of each query over the allowed keys of its block's candidate list.

    q ``[B, Tq, Hq, Dk]``, k, v ``[B, Tk, Hkv, D]``; ``cand [B, Hq, nQ, C]`` key indices for query block n
    (queries ``[n*query_block, (n+1)*query_block)``); ``allowed [B|1, Hq|1, nQ, query_block|1, C]`` which of them
    each query may use; ``bias [B, Hq, nQ, C]`` added to the scores (differentiable). Out-of-range candidates are never
    used, and a repeated one only through its first occurrence. Returns ``[B, Tq, Hq, Dv]`` in q's dtype.
    """
    cdt = compute_dtype(q.dtype)
    b, tq, h, d = q.shape
    tk, nq, c = k.shape[1], cand.shape[2], cand.shape[3]
    groups = h // k.shape[2]
    in_range = (cand >= 0) & (cand < tk)
    allowed = allowed & in_range[..., None, :]
    # a candidate allowed for some query of the block counts once (a repeat is never used)
    allowed = allowed & first_valid_occurrence(cand, in_range)[..., None, :]
    safe = cand.clamp(0, tk - 1).reshape(b, h, nq * c, 1)
    qb = torch.nn.functional.pad(q.to(cdt).transpose(1, 2), (0, 0, 0, nq * query_block - tq))
    qb = qb.reshape(b, h, nq, query_block, d)  # [B, H, nQ, bq, Dk]
    kr = repeat_kv(k, groups).to(cdt).transpose(1, 2)  # [B, H, Tk, Dk]
    vr = repeat_kv(v, groups).to(cdt).transpose(1, 2)  # [B, H, Tk, Dv]
    kc = kr.gather(2, safe.expand(-1, -1, -1, d)).view(b, h, nq, c, d)  # [B, H, nQ, C, Dk]
    vc = vr.gather(2, safe.expand(-1, -1, -1, vr.shape[-1])).view(b, h, nq, c, -1)  # [B, H, nQ, C, Dv]
    scores = qb @ kc.transpose(-1, -2) * scale  # [B, H, nQ, bq, C]
    if bias is not None:
        scores = scores + bias.to(cdt)[..., None, :]
    probs = masked_softmax(scores, allowed.expand_as(scores))  # rows with nothing allowed are 0
    out = (probs @ vc).reshape(b, h, nq * query_block, -1)[:, :, :tq]  # [B, H, Tq, Dv]
    return out.transpose(1, 2).to(q.dtype)


# ---- attention over per-query lists of key blocks ----------------------------------------------------------


def routed_block_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    blocks: torch.Tensor,
    valid: torch.Tensor,
    *,
    block_size: int,
    scale: float,
    q_pos: torch.Tensor | None = None,
    n_real: torch.Tensor | None = None,
    tile_rows: int = 16,
) -> torch.Tensor:
    """Exact softmax of each query over the keys of its own selected key blocks.

    q ``[B, Tq, Hq, Dk]``; k, v ``[B, Tk, Hkv, D]`` in block order (block c is keys ``[c*bs, (c+1)*bs)``);
    ``blocks, valid [B, Hq, Tq, m]``. ``q_pos [B|1, Tq]``: a query sees keys at index <= q_pos (None: no
    positional rule); ``n_real [B]``: keys at index >= n_real are padding. Returns ``[B, Tq, Hq, Dv]``.

    Valid (query, block) pairs are sorted by block and packed into tiles of ``tile_rows`` queries that share
    the block, so each tile is one small matmul against its block's keys; each tile row keeps its running max,
    sum and weighted values, and a query's pairs are merged by the log-sum-exp rule.
    """
    cdt = compute_dtype(q.dtype)
    b, tq, h, d = q.shape
    tk, bs, m = k.shape[1], block_size, blocks.shape[-1]
    nb = -(-tk // bs)
    groups = h // k.shape[2]
    bh = b * h

    def key_blocks(t: torch.Tensor) -> torch.Tensor:  # [B, Tk, Hkv, D] -> [B*H*nb, bs, D]
        t = repeat_kv(t, groups).to(cdt).transpose(1, 2)
        t = torch.nn.functional.pad(t, (0, 0, 0, nb * bs - tk))
        return t.reshape(bh * nb, bs, t.shape[-1])

    kb, vb = key_blocks(k), key_blocks(v)
    valid = first_valid_occurrence(blocks, valid & (blocks >= 0) & (blocks < nb))
    gid = torch.arange(bh, device=q.device).view(b, h, 1, 1) * nb + blocks.clamp(0, nb - 1)  # global block id
    pair = valid.reshape(-1).nonzero().squeeze(1)  # flat (b, h, t, slot) of each valid pair
    g, order = torch.sort(gid.reshape(-1)[pair], stable=True)
    pair = pair[order]
    row = pair // m  # flat (b, h, t) query row of each pair

    counts = torch.bincount(g, minlength=bh * nb)
    tiles_per = (counts + tile_rows - 1) // tile_rows
    tile_start = torch.cumsum(tiles_per, 0) - tiles_per
    first = torch.cumsum(counts, 0) - counts
    slot = tile_start[g] * tile_rows + torch.arange(g.numel(), device=q.device) - first[g]  # row in the tiles
    tile_g = torch.repeat_interleave(torch.arange(bh * nb, device=q.device), tiles_per)  # block of each tile
    n_tiles = tile_g.numel()

    qf = q.to(cdt).transpose(1, 2).reshape(bh * tq, d)
    qt = qf.new_zeros(n_tiles * tile_rows, d).index_copy(0, slot, qf[row]).view(n_tiles, tile_rows, d)
    scores = torch.bmm(qt, kb[tile_g].transpose(1, 2)) * scale  # [tiles, R, bs]

    key_idx = (tile_g % nb)[:, None] * bs + torch.arange(bs, device=q.device)  # [tiles, bs]
    ok = key_idx < tk
    if n_real is not None:
        ok = ok & (key_idx < n_real[tile_g // (h * nb)][:, None])
    ok = ok[:, None, :].expand(n_tiles, tile_rows, bs)
    if q_pos is not None:
        pos = q_pos.expand(b, tq)[:, None, :].expand(b, h, tq).reshape(-1)  # [B*H*Tq]
        row_pos = torch.full((n_tiles * tile_rows,), -1, dtype=torch.long, device=q.device)
        row_pos[slot] = pos[row]
        ok = ok & (key_idx[:, None, :] <= row_pos.view(n_tiles, tile_rows, 1))

    # per tile row: max, sum of exp, exp-weighted values (no NaN where a row sees nothing)
    top = scores.masked_fill(~ok, float("-inf")).amax(-1, keepdim=True).detach()
    seen = ok.any(-1, keepdim=True)
    top = torch.where(seen, top, torch.zeros_like(top))
    e = torch.where(ok, torch.exp(torch.where(ok, scores, top) - top), torch.zeros_like(scores))
    part_sum = e.sum(-1).reshape(-1)[slot]  # [P]
    part_out = torch.bmm(e, vb[tile_g]).reshape(n_tiles * tile_rows, vb.shape[-1])[slot]  # [P, Dv]
    part_top = torch.where(seen, top, torch.full_like(top, float("-inf"))).reshape(-1)[slot]

    # merge a query's pairs: weights exp(top_pair - top_query)
    q_top = torch.full((bh * tq,), float("-inf"), dtype=cdt, device=q.device)
    q_top = q_top.scatter_reduce(0, row, part_top, "amax")
    w = torch.where(part_top > float("-inf"), torch.exp(part_top - q_top[row].clamp_min(-3e38)), 0.0)
    num = torch.zeros(bh * tq, vb.shape[-1], dtype=cdt, device=q.device).index_add(0, row, w[:, None] * part_out)
    den = torch.zeros(bh * tq, dtype=cdt, device=q.device).index_add(0, row, w * part_sum)
    out = torch.where(den[:, None] > 0, num / den.clamp_min(torch.finfo(cdt).tiny)[:, None], 0.0)
    return out.view(b, h, tq, -1).transpose(1, 2).to(q.dtype)
