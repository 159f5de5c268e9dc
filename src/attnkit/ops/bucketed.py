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
never ``[T, T]`` unless one group holds everything; work: the sum over groups of (queries x keys), padded
(in causal patterns too: a tile covers its whole group, with the future keys hidden).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..patterns import MaskPredicate
from .reference import compute_dtype

DEFAULT_BLOCK = 16  # slots per block: groups are padded to a multiple of it (less padding; tiles stay group-sized)
CHUNK_SCORES = 1 << 20  # score entries (tiles x query slots x key slots) computed at once


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


@dataclass(frozen=True)
class PairFeatures:
    """Kernel features whose products a caller wants on the same support (Scatterbrain subtracts its low-rank
    estimate there): ``q [B, Tq, Hq, F]`` (scaled by ``exp(-q_log_scale)`` per query), ``k [B, Tk, Hkv, F]``,
    ``q_log_scale [B, Tq, Hq]``, so that the estimate of pair (i, j) is ``q_i . k_j * exp(q_log_scale_i)``."""

    q: torch.Tensor
    k: torch.Tensor
    q_log_scale: torch.Tensor


@dataclass(frozen=True)
class RoundPartials:
    """Per round and query (``[R, B, Hq, Tq]``, numerators ``[..., Dv]``), all relative to ``exp(row_max)``:
    ``den = sum_j exp(s_ij)``, ``num = sum_j exp(s_ij) v_j`` over the pairs the round counts, and with features
    ``feature_den``, ``feature_num``, the same sums of the features' estimate. ``row_max`` is -inf (and the sums
    0) where the round gives the query no key; it carries no gradient (it cancels)."""

    row_max: torch.Tensor
    den: torch.Tensor
    num: torch.Tensor
    feature_den: torch.Tensor | None = None
    feature_num: torch.Tensor | None = None


@dataclass(frozen=True)
class _Layout:
    """Where each token goes: its padded slot per round (``[R*B*Hq*T]``, -1: its group meets nobody), the
    number of slots, and the tiles ``(round, query blocks, key blocks, groups)`` in layout order."""

    q_slot: torch.Tensor
    k_slot: torch.Tensor
    n_q_slots: int
    n_k_slots: int
    tiles: list[tuple[int, int, int, int]]


def _lay_out(q_groups: torch.Tensor, k_groups: torch.Tensor, n_groups: int, block: int) -> _Layout:
    """Composite groups (round, batch, head, group), sorted by class (round, query blocks, key blocks) so that
    the groups of one class are contiguous tiles of equal size."""
    b, hq, rounds, _ = q_groups.shape
    device = q_groups.device
    g_all = n_groups + 1  # group n_groups holds padded keys: no query is in it
    stream = torch.arange(rounds * b * hq, device=device).view(rounds, b, hq, 1)  # [R, B, Hq, 1]
    q_comp = (stream * g_all + q_groups.permute(2, 0, 1, 3)).reshape(-1)  # [R*B*Hq*Tq]
    k_comp = (stream * g_all + k_groups.permute(2, 0, 1, 3)).reshape(-1)  # [R*B*Hq*Tk]
    n_comp = rounds * b * hq * g_all
    q_count = torch.bincount(q_comp, minlength=n_comp)
    k_count = torch.bincount(k_comp, minlength=n_comp)
    active = (q_count > 0) & (k_count > 0)  # groups where some query meets some key
    nbq = torch.where(active, torch.div(q_count + block - 1, block, rounding_mode="floor"), 0)
    nbk = torch.where(active, torch.div(k_count + block - 1, block, rounding_mode="floor"), 0)
    group_round = torch.arange(n_comp, device=device) // (g_all * b * hq)
    klass = (group_round * (int(nbq.max()) + 1) + nbq) * (int(nbk.max()) + 1) + nbk
    group_order = torch.sort(klass, stable=True).indices
    ordered = group_order[active[group_order]]  # active groups in layout order
    _, sizes = torch.unique_consecutive(klass[ordered], return_counts=True)
    first = ordered[torch.cumsum(sizes, 0) - sizes]  # first group of each class
    tiles = list(
        zip(group_round[first].tolist(), nbq[first].tolist(), nbk[first].tolist(), sizes.tolist(), strict=True)
    )
    return _Layout(
        _token_slots(q_comp, q_count, _group_starts(nbq, group_order), active, block),
        _token_slots(k_comp, k_count, _group_starts(nbk, group_order), active, block),
        int(nbq.sum()) * block,
        int(nbk.sum()) * block,
        tiles,
    )


def _block_for(block: int, mean_group: float) -> int:
    """``block``, or a smaller power of two (at least 4) when groups are smaller on average: padding a group of
    4 tokens to 16 slots would do 16 times the work (the layout only; the result is the same)."""
    fit = 4
    while fit < block and fit < mean_group:
        fit *= 2
    return min(block, fit)


def _gather_rows(t: torch.Tensor, table: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows ``table`` of ``t`` viewed as ``[rows, last dim]`` (-1, an empty slot, reads row 0), in ``dtype``.

    index_select: twice as fast as advanced indexing for row gathers on CPU."""
    return t.reshape(-1, t.shape[-1]).index_select(0, table.clamp_min(0)).to(dtype)


def bucketed_partials(
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
    features: PairFeatures | None = None,
) -> RoundPartials:
    """Per round, each query's softmax sums over the keys that share its group (see :class:`RoundPartials`).

    ``q [B,Tq,Hq,D], k [B,Tk,Hkv,D], v [B,Tk,Hkv,Dv]``; ``q_groups [B, Hq, R, Tq]``, ``k_groups [B, Hq, R, Tk]``
    in ``[0, n_groups)``, per query head (GQA: query head h reads kv head h // (Hq / Hkv))."""
    b, tq, hq, d = q.shape
    tk, hkv, dv = k.shape[1], k.shape[2], v.shape[3]
    rounds, device, cdt = q_groups.shape[2], q.device, compute_dtype(q.dtype)
    kg = k_groups if key_padding_mask is None else torch.where(key_padding_mask[:, None, None, :], k_groups, n_groups)
    block = _block_for(block, max(tq, tk) / n_groups)
    lay = _lay_out(q_groups, kg, n_groups, block)

    # ---- per slot: source rows, positions, group ids of every round ----
    tq_ar, tk_ar = torch.arange(tq, device=device), torch.arange(tk, device=device)
    bb, hh = torch.arange(b, device=device).view(b, 1, 1), torch.arange(hq, device=device).view(1, hq, 1)
    q_rows = ((bb * tq + tq_ar) * hq + hh).expand(rounds, b, hq, tq).reshape(-1)  # row of q in [B*Tq*Hq]
    k_rows = ((bb * tk + tk_ar) * hkv + hh // (hq // hkv)).expand(rounds, b, hq, tk).reshape(-1)
    q_table = _slot_table(lay.q_slot, q_rows, lay.n_q_slots, -1)
    k_table = _slot_table(lay.k_slot, k_rows, lay.n_k_slots, -1)
    q_blocks, k_blocks, v_blocks = (
        _gather_rows(q, q_table, cdt),
        _gather_rows(k, k_table, cdt),
        _gather_rows(v, k_table, cdt),
    )
    k_empty = k_table < 0  # [NKS] slots of no key: their queries get a -inf bias
    k_bias = torch.where(k_empty, float("-inf"), 0.0).to(cdt)
    q_pos = _slot_table(lay.q_slot, tq_ar.repeat(rounds * b * hq), lay.n_q_slots, -1)
    k_pos = _slot_table(lay.k_slot, tk_ar.repeat(rounds * b * hq), lay.n_k_slots, tk + tq + q_offset)
    q_ids = _round_ids(q_groups, lay.q_slot, lay.n_q_slots, -1)  # [R, NQS]
    k_ids = _round_ids(k_groups, lay.k_slot, lay.n_k_slots, -2)
    if features is not None:
        fq, fk = _gather_rows(features.q, q_table, cdt), _gather_rows(features.k, k_table, cdt)  # [NQS, F], [NKS, F]
        log_scale = _gather_rows(features.q_log_scale[..., None], q_table, cdt)[:, 0]  # [NQS]

    # ---- one batched score tile per group, class by class ----
    tracked = [q, k, v] + ([features.q, features.k, features.q_log_scale] if features is not None else [])
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in tracked)
    out = _SlotOutputs(lay, (rounds, b, hq, tq), q_blocks, grad)
    q0 = k0 = 0
    for r, a, c, n in lay.tiles:
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
            if features is not None:  # the features' estimate is stabilised by the same row factor
                row_max = torch.maximum(row_max, log_scale[qsl].detach().view(m, qa))
            safe_max = torch.where(torch.isfinite(row_max), row_max, 0.0)
            probs = scores.sub_(safe_max[..., None]).exp_()
            vals = v_blocks[ksl].view(m, kc, dv)
            out.add("row_max", qsl, row_max.reshape(-1))
            out.add("den", qsl, probs.sum(-1).reshape(-1))
            out.add("num", qsl, torch.bmm(probs, vals).reshape(-1, dv))
            if features is not None:
                est = torch.bmm(fq[qsl].view(m, qa, -1), fk[ksl].view(m, kc, -1).transpose(1, 2))  # [m, qa, kc]
                gone = k_empty[ksl].view(m, 1, kc) if hide is None else hide | k_empty[ksl].view(m, 1, kc)
                est = est.masked_fill_(gone, 0.0) * torch.exp(log_scale[qsl].view(m, qa) - safe_max)[..., None]
                out.add("feature_den", qsl, est.sum(-1).reshape(-1))
                out.add("feature_num", qsl, torch.bmm(est, vals).reshape(-1, dv))
        q0, k0 = q0 + n * qa, k0 + n * kc

    feats = (out.result("feature_den"), out.result("feature_num", (dv,))) if features is not None else (None, None)
    return RoundPartials(out.result("row_max"), out.result("den"), out.result("num", (dv,)), *feats)


class _SlotOutputs:
    """The tiles' results per query slot, delivered in token order ``[R, B, Hq, Tq(, Dv)]`` (tokens in no tile get
    the fill: -inf for ``row_max``, else 0). Without autograd each chunk is written straight to its tokens; with
    it, the chunks are joined once and gathered (in-place writes would cost a copy of the whole per chunk)."""

    def __init__(self, lay: _Layout, dims: tuple[int, int, int, int], like: torch.Tensor, grad: bool):
        self.dims, self.like, self.grad = dims, like, grad
        self.n_tokens = dims[0] * dims[1] * dims[2] * dims[3]
        if grad:
            self.parts: dict[str, list[torch.Tensor]] = {}
            self.at = torch.where(lay.q_slot >= 0, lay.q_slot, lay.n_q_slots)  # [R*B*Hq*Tq]; the sentinel row
        else:
            tokens = torch.arange(self.n_tokens, device=like.device)
            self.token_of_slot = _slot_table(lay.q_slot, tokens, lay.n_q_slots, self.n_tokens)  # empty: a sink row
            self.buffers: dict[str, torch.Tensor] = {}

    @staticmethod
    def fill(name: str) -> float:
        return float("-inf") if name == "row_max" else 0.0

    def add(self, name: str, slots: slice, values: torch.Tensor) -> None:
        """``values [slots]`` or ``[slots, Dv]`` of the query slots ``slots``."""
        if self.grad:
            self.parts.setdefault(name, []).append(values)
            return
        if name not in self.buffers:
            self.buffers[name] = self.like.new_full((self.n_tokens + 1, *values.shape[1:]), self.fill(name))
        self.buffers[name].index_copy_(0, self.token_of_slot[slots], values)

    def result(self, name: str, width: tuple[int, ...] = ()) -> torch.Tensor:
        sentinel = self.like.new_full((1, *width), self.fill(name))
        if self.grad:
            rows = torch.cat([*self.parts.get(name, []), sentinel]).index_select(0, self.at)
        else:
            rows = self.buffers.get(name, sentinel.expand(self.n_tokens + 1, *width))[: self.n_tokens]
        return rows.reshape(*self.dims, *width)


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
    """``[B,Tq,Hq,Dv]``: softmax over the keys sharing a group with the query in some round (rows seeing no key
    are 0). Arguments as :func:`bucketed_partials`."""
    p = bucketed_partials(
        q, k, v, q_groups, k_groups, n_groups=n_groups, scale=scale, causal=causal, q_offset=q_offset,
        key_padding_mask=key_padding_mask, block=block,
    )  # fmt: skip
    weight = round_weights(p.row_max, common_scale(p.row_max))  # [R, B, Hq, Tq]
    den, num = (weight * p.den).sum(0), (weight[..., None] * p.num).sum(0)
    seen = den > 0
    out = torch.where(seen[..., None], num / torch.where(seen, den, 1.0)[..., None], 0.0)  # [B, Hq, Tq, Dv]
    out = out + sum(t.reshape(-1)[:0].sum() for t in (q, k, v))  # an empty sum, 0: every input stays in the graph
    return out.transpose(1, 2).to(q.dtype)


def common_scale(row_max: torch.Tensor, *others: torch.Tensor) -> torch.Tensor:
    """The largest of ``row_max [R, ...]`` over rounds and of ``others`` (more log-scales of the same queries),
    detached and finite (0 where everything is -inf): the scale partial sums are put on."""
    top = row_max.amax(0)
    for extra in others:
        top = torch.maximum(top, extra.detach())
    return torch.where(torch.isfinite(top), top, 0.0)


def round_weights(row_max: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """``exp(row_max - top)`` per round, 0 where a round gave the query nothing (``row_max`` -inf)."""
    return torch.where(torch.isfinite(row_max), torch.exp(row_max - top), 0.0)


def _round_ids(groups: torch.Tensor, slot: torch.Tensor, size: int, empty: int) -> torch.Tensor:
    """``[R, size]``: for each slot, its token's group id in every round (``empty`` in unused slots).

    Narrow integers: the compares over every score entry are memory-bound."""
    rounds = groups.shape[2]
    small = torch.int16 if groups.numel() == 0 or int(groups.max()) < 2**15 else torch.int32
    per_token = groups.permute(2, 0, 1, 3).reshape(rounds, -1).to(small)  # [R, B*H*T]
    per_token = per_token.repeat(1, rounds)  # the token of slot order (round, b, h, t), each round's id
    return torch.stack([_slot_table(slot, per_token[r], size, empty) for r in range(rounds)])
