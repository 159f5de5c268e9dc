"""Exact softmax attention restricted to (query, key) pairs that share a group id in any of several rounds.

Each query and key carries one group id per round (an LSH bucket, a k-means cluster): ``q_groups
[B, Hq, R, Tq]`` and ``k_groups [B, Hq, R, Tk]`` in ``[0, n_groups)``. Query i sees key j when

    they share a group in at least one round   and   the pattern allows it (causal: j <= i + q_offset)
    and key j is not padding,

and gets the plain softmax over exactly those keys (a pair shared in several rounds counts once). The
specification is :func:`group_predicate`, a mask predicate for dense references.

The fast algorithm (:func:`bucketed_attention`): per (round, batch row, head) stream, sort queries and keys
by (group, position) and pad each group to a multiple of ``block`` slots, so groups of any size are exact.
Groups are laid out sorted by (round, query blocks, key blocks): all groups of one such class are then
contiguous, equal-sized tiles, and one batched matmul per class (in chunks of bounded size) computes each
group's full ``[queries x keys]`` scores with no gather per tile. Each query gets one partial softmax per
round (its row max, normaliser and numerator); the rounds are merged at the end. A pair shared in several
rounds is counted only in the first round that shares it (the union). Memory: O(T·rounds) plus one chunk,
never ``[T, T]`` unless one group holds everything; work: the sum over groups of (queries x keys), padded.
"""

from __future__ import annotations

import torch

from ..patterns import MaskPredicate
from .reference import compute_dtype

DEFAULT_BLOCK = 16  # slots per block: groups are padded to a multiple of it (less padding; tiles stay group-sized)
CHUNK_SCORES = 1 << 22  # score entries (block pairs x block x block) computed at once


def shared_group_mask(q_groups: torch.Tensor, k_groups: torch.Tensor) -> torch.Tensor:
    """``[B, H, R, Tq]``, ``[B, H, R, Tk]`` -> bool ``[B, H, Tq, Tk]``: share a group in some round."""
    return (q_groups[..., :, None] == k_groups[..., None, :]).any(dim=2)


def group_predicate(q_groups: torch.Tensor, k_groups: torch.Tensor, q_offset: int = 0) -> MaskPredicate:
    """The mask predicate ``pred(b, h, q_idx, kv_idx)`` of "query and key share a group in some round"
    (``q_idx`` in key coordinates: query i sits at ``i + q_offset``)."""
    shared = shared_group_mask(q_groups, k_groups)  # [B, H, Tq, Tk]

    def pred(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        return shared[b, h, q_idx - q_offset, kv_idx]

    return pred


def _group_starts(nblocks: torch.Tensor, group_order: torch.Tensor) -> torch.Tensor:
    """First block of each group when the groups are laid out in ``group_order``: ``[G]``."""
    in_order = nblocks[group_order]
    starts = torch.empty_like(nblocks)
    starts[group_order] = torch.cumsum(in_order, 0) - in_order
    return starts


def _token_slots(composite: torch.Tensor, counts: torch.Tensor, starts: torch.Tensor, active, block: int):
    """Padded slot of every token (``[N]``, token order; -1 for tokens of inactive groups): a group's tokens
    fill its blocks in position order."""
    sorted_c, order = torch.sort(composite, stable=True)
    group_first = torch.cumsum(counts, 0) - counts  # first sorted index of each group
    rank = torch.arange(composite.numel(), device=composite.device) - group_first[sorted_c]
    slot_sorted = torch.where(active[sorted_c], starts[sorted_c] * block + rank, -1)
    slot = torch.empty_like(slot_sorted)
    slot[order] = slot_sorted
    return slot


def _slot_table(slot: torch.Tensor, values: torch.Tensor, size: int, empty) -> torch.Tensor:
    """``[size]``: ``values`` at their tokens' slots, ``empty`` in unused slots."""
    table = torch.full((size,), empty, dtype=values.dtype, device=values.device)
    used = slot >= 0
    table[slot[used]] = values[used]
    return table


def bucketed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_groups: torch.Tensor,
    k_groups: torch.Tensor,
    *,
    n_groups: int,
    scale: float,
    causal: bool,
    q_offset: int = 0,
    key_padding_mask: torch.Tensor | None = None,
    block: int = DEFAULT_BLOCK,
) -> torch.Tensor:
    """``q [B,Tq,Hq,D], k [B,Tk,Hkv,D], v [B,Tk,Hkv,Dv] -> [B,Tq,Hq,Dv]`` (rows seeing no key are 0).

    ``q_groups [B, Hq, R, Tq]``, ``k_groups [B, Hq, R, Tk]`` in ``[0, n_groups)``, per query head (GQA: query
    head h reads kv head h // (Hq / Hkv))."""
    b, tq, hq, d = q.shape
    tk, hkv, dv = k.shape[1], k.shape[2], v.shape[3]
    rounds, device, cdt = q_groups.shape[2], q.device, compute_dtype(q.dtype)
    g_all = n_groups + 1  # one more group for padded keys: no query is in it, so they meet nobody

    # ---- composite group of every token, streams ordered (round, batch, head) ----
    stream = (torch.arange(rounds, device=device).view(-1, 1, 1) * (b * hq)) + torch.arange(b * hq, device=device).view(
        1, b, hq
    )  # [R, B, Hq]
    kg = k_groups if key_padding_mask is None else torch.where(key_padding_mask[:, None, None, :], k_groups, n_groups)
    q_comp = (stream[..., None] * g_all + q_groups.permute(2, 0, 1, 3)).reshape(-1)  # [R*B*Hq*Tq]
    k_comp = (stream[..., None] * g_all + kg.permute(2, 0, 1, 3)).reshape(-1)  # [R*B*Hq*Tk]
    n_comp = rounds * b * hq * g_all

    # ---- groups with queries and keys, laid out by class (round, query blocks, key blocks) ----
    q_count = torch.bincount(q_comp, minlength=n_comp)
    k_count = torch.bincount(k_comp, minlength=n_comp)
    active = (q_count > 0) & (k_count > 0)
    nbq = torch.where(active, torch.div(q_count + block - 1, block, rounding_mode="floor"), 0)
    nbk = torch.where(active, torch.div(k_count + block - 1, block, rounding_mode="floor"), 0)
    group_round = torch.arange(n_comp, device=device) // (g_all * b * hq)
    height, width = int(nbq.max()) + 1, int(nbk.max()) + 1
    klass = (group_round * height + nbq) * width + nbk
    group_order = torch.sort(klass, stable=True).indices
    q_slot = _token_slots(q_comp, q_count, _group_starts(nbq, group_order), active, block)  # [R*B*Hq*Tq]
    k_slot = _token_slots(k_comp, k_count, _group_starts(nbk, group_order), active, block)
    n_qs, n_ks = int(nbq.sum()) * block, int(nbk.sum()) * block

    # ---- per slot: source rows (a zero row for empty slots), positions, group ids of every round ----
    tq_ar, tk_ar = torch.arange(tq, device=device), torch.arange(tk, device=device)
    bb, hh = torch.arange(b, device=device).view(b, 1, 1), torch.arange(hq, device=device).view(1, hq, 1)
    q_rows = ((bb * tq + tq_ar) * hq + hh).expand(rounds, b, hq, tq).reshape(-1)  # row of q in [B*Tq*Hq]
    k_rows = ((bb * tk + tk_ar) * hkv + hh // (hq // hkv)).expand(rounds, b, hq, tk).reshape(-1)
    # index_select (twice as fast as advanced indexing for row gathers on CPU); empty slots read row 0: their
    # queries go nowhere and their keys get a -inf bias
    q_row_table = _slot_table(q_slot, q_rows, n_qs, -1)
    k_row_table = _slot_table(k_slot, k_rows, n_ks, -1)
    q_blocks = q.reshape(-1, d).index_select(0, q_row_table.clamp_min(0)).to(cdt)  # [NQS, D]
    k_blocks = k.reshape(-1, d).index_select(0, k_row_table.clamp_min(0)).to(cdt)  # [NKS, D]
    v_blocks = v.reshape(-1, dv).index_select(0, k_row_table.clamp_min(0)).to(cdt)  # [NKS, Dv]
    k_bias = torch.where(k_row_table < 0, float("-inf"), 0.0).to(cdt)  # [NKS]
    q_pos = _slot_table(q_slot, tq_ar.repeat(rounds * b * hq), n_qs, -1)
    k_pos = _slot_table(k_slot, tk_ar.repeat(rounds * b * hq), n_ks, tk + tq + q_offset)
    q_ids = _round_ids(q_groups, q_slot, n_qs, -1)  # [R, NQS]
    k_ids = _round_ids(k_groups, k_slot, n_ks, -2)

    # ---- one batched score tile per group, class by class ----
    og = group_order[active[group_order]]  # active groups in layout order
    _, sizes = torch.unique_consecutive(klass[og], return_counts=True)
    first = torch.cumsum(sizes, 0) - sizes
    tiles = zip(
        group_round[og[first]].tolist(), nbq[og[first]].tolist(), nbk[og[first]].tolist(), sizes.tolist(), strict=True
    )
    maxes, dens, nums = [], [], []
    q0 = k0 = 0
    for r, a, c, n in tiles:
        qa, kc = a * block, c * block  # slots per tile
        per_chunk = max(1, CHUNK_SCORES // (qa * kc))
        for i in range(0, n, per_chunk):
            m = min(per_chunk, n - i)
            qsl, ksl = slice(q0 + i * qa, q0 + (i + m) * qa), slice(k0 + i * kc, k0 + (i + m) * kc)
            scores = torch.baddbmm(
                k_bias[ksl].view(m, 1, kc),
                q_blocks[qsl].view(m, qa, d),
                k_blocks[ksl].view(m, kc, d).transpose(1, 2),
                alpha=scale,
            )  # [m, qa, kc]
            hide = None
            if causal:
                hide = k_pos[ksl].view(m, 1, kc) > q_pos[qsl].view(m, qa, 1) + q_offset
            for earlier in range(r):  # a pair shared in an earlier round was counted there
                same = q_ids[earlier, qsl].view(m, qa, 1) == k_ids[earlier, ksl].view(m, 1, kc)
                hide = same if hide is None else hide.logical_or_(same)
            if hide is not None:
                scores = scores.masked_fill_(hide, float("-inf"))
            row_max = scores.detach().amax(-1)  # [m, qa]; -inf where nothing is visible
            probs = scores.sub_(torch.where(torch.isfinite(row_max), row_max, 0.0)[..., None]).exp_()
            maxes.append(row_max.reshape(-1))
            dens.append(probs.sum(-1).reshape(-1))
            nums.append(torch.bmm(probs, v_blocks[ksl].view(m, kc, dv)).reshape(-1, dv))
        q0, k0 = q0 + n * qa, k0 + n * kc
    out = _merge_rounds(q_slot, maxes, dens, nums, (rounds, b, hq, tq), dv, q_blocks)
    out = out + sum(t.reshape(-1)[:0].sum() for t in (q, k, v))  # an empty sum, 0: every input stays in the graph
    return out.to(q.dtype)


def _round_ids(groups: torch.Tensor, slot: torch.Tensor, size: int, empty: int) -> torch.Tensor:
    """``[R, size]``: for each slot, its token's group id in every round (``empty`` in unused slots).

    Narrow integers: the compares over every score entry are memory-bound."""
    rounds = groups.shape[2]
    small = torch.int16 if groups.numel() == 0 or int(groups.max()) < 2**15 else torch.int32
    per_token = groups.permute(2, 0, 1, 3).reshape(rounds, -1).to(small)  # [R, B*H*T]
    per_token = per_token.repeat(1, rounds)  # the token of slot order (round, b, h, t), each round's id
    return torch.stack([_slot_table(slot, per_token[r], size, empty) for r in range(rounds)])


def _merge_rounds(q_slot, maxes, dens, nums, dims, dv: int, like: torch.Tensor) -> torch.Tensor:
    """Each query's partial softmax per round (max, normaliser, numerator, in slot order) merged into
    ``[B, Tq, Hq, Dv]``; a query that sees no key in any round gets 0."""
    rounds, b, hq, tq = dims
    n_slots = sum(x.numel() for x in maxes)
    at = torch.where(q_slot >= 0, q_slot, n_slots)  # [R*B*Hq*Tq]; unused: the sentinel row
    row_max = torch.cat([*maxes, like.new_full((1,), float("-inf"))]).index_select(0, at).view(dims)  # [R, B, Hq, Tq]
    den = torch.cat([*dens, like.new_zeros(1)]).index_select(0, at).view(dims)
    num = torch.cat([*nums, like.new_zeros(1, dv)]).index_select(0, at).view(*dims, dv)  # [R, B, Hq, Tq, Dv]
    if rounds > 1:
        top = row_max.amax(0)
        top = torch.where(torch.isfinite(top), top, 0.0)
        weight = torch.where(torch.isfinite(row_max), torch.exp(row_max - top), 0.0)  # [R, B, Hq, Tq]
        den, num = (weight * den).sum(0), (weight[..., None] * num).sum(0)
    else:
        den, num = den[0], num[0]
    seen = den > 0
    out = torch.where(seen[..., None], num / torch.where(seen, den, 1.0)[..., None], 0.0)  # [B, Hq, Tq, Dv]
    return out.transpose(1, 2)
