"""Combiner (fixed factorisation) — Combiner: Full Attention Transformer with Sparse Computation Cost
(Ren et al., 2021, arXiv:2107.05768).

The sequence is cut into blocks of ``block`` tokens. A query attends directly to the keys of its own block
and indirectly to every other block r through that block's abstraction (mean key k̄_r, mean value v̄_r), all
under ONE softmax whose normaliser is shared by the direct keys and the abstractions:

    out_i = [ sum_{j in own(i)} e^{s q_i.k_j} v_j + sum_{r in far(i)} n_r e^{s q_i.k̄_r} v̄_r ] / Z_i,
    Z_i   =   sum_{j in own(i)} e^{s q_i.k_j}     + sum_{r in far(i)} n_r e^{s q_i.k̄_r}

Choices where the paper leaves room:
- Combiner-Fixed with uniform p(j | block r): block r stands for its n_r real tokens, so its abstraction's logit
  is ``s q.k̄_r + log n_r``; a block whose keys (and values) are all equal then gives exact softmax.
- The abstraction is the mean over the block's real (unpadded) tokens; a block with none is left out.
- Blocks are counted over real tokens (block r holds a row's real tokens r·block .. r·block + block - 1), so
  padding never moves a block boundary; they never depend on the call's length (``block`` is an option).
- In a self pattern a padded position is not a token: as a query it sees nothing and outputs 0.
- Causal: the own block's keys up to the query, and only the blocks wholly before the query's block (complete
  blocks); noncausal: the own block and every other block (the last one may be short).
- A query that sees no real key outputs 0.

The ``blocked`` path reshapes queries and keys to blocks and runs batched matmuls over [own block keys ;
block summaries], time O(T·(block + T/block)·D), O(T·√T) at block ≈ √T; score tensors are made a bounded chunk
of query blocks at a time, so memory beyond the inputs is O(T·D). Decoding keeps a KV cache (summaries of past
blocks are recomputed from it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..inputs import AttentionInputs
from ..mechanism import Complexity, Mechanism, Paper, Shape, fast_path, register_mechanism
from ..ops.masking import masked_softmax, visibility
from ..ops.pooled import block_means, blocked, real_mask
from ..ops.reference import upcast_qkv, zeros_in_graph
from ..options import check_int
from ..patterns import MaskPredicate, Pattern, and_masks, dense_mask
from ..state import KVCache

# Score elements (batch x heads x queries x keys) one chunk of query blocks may hold in the blocked path:
# bounds its memory whatever T is (4 MiB of fp32 scores per chunk, a few such temporaries alive).
CHUNK_SCORES = 1 << 20


@dataclass(frozen=True)
class CombinerOptions:
    block: int = 64  # real tokens per block: direct attention inside it, one mean summary for each other block

    def __post_init__(self):
        check_int("combiner", "block", self.block)


def token_ranks(x: AttentionInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """``rank [B, Tk]``: each key position's index among its row's real tokens (padding: that of the real token
    before it), and ``real [B, Tk]`` (True = real token)."""
    real = x.key_padding_mask
    if real is None:
        real = torch.ones(x.batch, x.tk, dtype=torch.bool, device=x.k.device)
    return real.long().cumsum(dim=1) - 1, real


def same_block(rank: torch.Tensor, block: int) -> MaskPredicate:
    """Key j is in the block of the query (blocks counted over real tokens)."""

    def pred(b, h, q_idx, kv_idx):
        return rank[b, kv_idx] // block == rank[b, q_idx] // block

    return pred


def far_block(rank: torch.Tensor, block: int, *, causal: bool) -> MaskPredicate:
    """Here ``kv_idx`` is a block id r: the blocks a query reaches through their summary (causal: those
    wholly before its own block; noncausal: every other block)."""

    def pred(b, h, q_idx, kv_idx):
        own = rank[b, q_idx] // block
        return kv_idx < own if causal else kv_idx != own

    return pred


def real_query(real: torch.Tensor) -> MaskPredicate:
    """The query's position is a real token (a padded position of a self pattern sees nothing)."""
    return lambda b, h, q_idx, kv_idx: real[b, q_idx]


@register_mechanism("combiner")
class Combiner(Mechanism):
    family = "low-rank + sparse"
    paper = Paper("Combiner: Full Attention Transformer with Sparse Computation Cost", 2021, "2107.05768")
    patterns = frozenset({Pattern.NONCAUSAL_SELF, Pattern.CAUSAL_SELF})
    exact = False
    heads_independent = True
    state_kind = KVCache
    complexity = Complexity(time="O(T·(block + T/block)·D)", memory="O(T·D) (scores in bounded chunks)")
    Options = CombinerOptions
    example_options = ({"block": 4}, {"block": 16})
    fidelity_knob = ("block", (16, 64, 256))

    def reference(self, x: AttentionInputs):
        s, causal = self.options.block, x.pattern is Pattern.CAUSAL_SELF
        q, k, v = upcast_qkv(x)  # [B, Tq, H, Dk], [B, Tk, H, D*]
        rank, real = token_ranks(x)  # [B, Tk]
        nb = -(-x.tk // s)
        # member[b, r, j]: key j is a real token of block r; a block's summary is the mean of its members
        block_ids = torch.arange(nb, device=q.device)[None, :, None]  # [1, nb, 1]
        member = (real[:, None, :] & ((rank // s)[:, None, :] == block_ids)).to(q.dtype)  # [B, nb, Tk]
        counts = member.sum(-1)  # [B, nb]
        k_real = torch.where(real[:, :, None, None], k, 0.0)
        v_real = torch.where(real[:, :, None, None], v, 0.0)
        k_sum = torch.einsum("brj,bjhd->brhd", member, k_real) / counts.clamp(min=1)[..., None, None]  # [B, nb, H, Dk]
        v_sum = torch.einsum("brj,bjhd->brhd", member, v_real) / counts.clamp(min=1)[..., None, None]  # [B, nb, H, Dv]

        direct = torch.einsum("bqhd,bkhd->bhqk", q, k) * x.scale  # [B, H, Tq, Tk]
        far = torch.einsum("bqhd,brhd->bhqr", q, k_sum) * x.scale + counts.clamp(min=1).log()[:, None, None, :]
        queries = real_query(real)
        direct_seen = visibility(x, and_masks(same_block(rank, s), queries))  # [B, 1, Tq, Tk]
        far_pred = and_masks(far_block(rank, s, causal=causal), queries)
        far_seen = dense_mask(far_pred, x.tq, nb, q_offset=x.q_offset, batch=x.batch, device=q.device)
        far_seen = far_seen & (counts > 0)[:, None, None, :]  # [B, 1, Tq, nb]: only blocks with a real token
        rows = (x.batch, 1, x.tq)
        seen = torch.cat([direct_seen.expand(*rows, x.tk), far_seen.expand(*rows, nb)], dim=-1)
        probs = masked_softmax(torch.cat([direct, far], dim=-1), seen)  # [B, H, Tq, Tk + nb]: one softmax
        out = torch.einsum("bhqk,bkhd->bqhd", probs[..., : x.tk], v)
        out = out + torch.einsum("bhqr,brhd->bqhd", probs[..., x.tk :], v_sum)  # [B, Tq, H, Dv]
        return out.to(x.q.dtype), None

    @fast_path("blocked", priority=10)
    def blocked_path(self, x: AttentionInputs):
        s, causal = self.options.block, x.pattern is Pattern.CAUSAL_SELF
        q, k, v = upcast_qkv(x)
        placed = _place(x, q, k, v, s)
        if placed is None:  # no real query anywhere
            return zeros_in_graph(x), None
        k_sum, counts = block_means(placed.k, placed.valid, s)  # [B, nb, H, Dk], [B, nb]
        v_sum, _ = block_means(placed.v, placed.valid, s)
        lo, nq = placed.first_block, placed.q.shape[1] // s
        heads_first = (0, 3, 1, 2, 4)  # [B, n, s, H, D] -> [B, H, n, s, D]
        qb = placed.q.view(x.batch, nq, s, x.heads, -1).permute(heads_first)  # [B, H, nq, s, Dk]
        kb = blocked(placed.k, s)[:, lo : lo + nq].permute(heads_first)  # [B, H, nq, s, Dk]: their own blocks
        vb = blocked(placed.v, s)[:, lo : lo + nq].permute(heads_first)  # [B, H, nq, s, Dv]
        valid = blocked(real_mask(placed.valid, x.batch, x.tk, q.device), s, value=False)[:, lo : lo + nq]
        summ = _Summaries(k=k_sum.transpose(1, 2), v=v_sum.transpose(1, 2), counts=counts, first=lo, causal=causal)
        step = max(1, CHUNK_SCORES // (x.batch * x.heads * s * (s + counts.shape[1])))  # query blocks per chunk
        outs = [
            _attend_blocks(
                qb[:, :, c : c + step],
                kb[:, :, c : c + step],
                vb[:, :, c : c + step],
                valid[:, c : c + step],
                summ,
                c,
                x.scale,
            )  # fmt: skip
            for c in range(0, nq, step)
        ]
        out = torch.cat(outs, dim=2).permute(0, 2, 3, 1, 4).flatten(1, 2)  # [B, nq * s, H, Dv], by rank slot
        return placed.unplace(out).to(x.q.dtype), None

    def flops(self, shape: Shape, pattern: Pattern) -> float:
        s, t = self.options.block, shape.tq
        lengths = [min(s, t - start) for start in range(0, t, s)]
        if pattern is Pattern.CAUSAL_SELF:
            pairs = sum(n * (n + 1) // 2 + n * r for r, n in enumerate(lengths))
        else:
            pairs = sum(n * n + n * (len(lengths) - 1) for n in lengths)
        return 2.0 * shape.batch * shape.heads * pairs * (shape.dk + shape.dv)


@dataclass(frozen=True)
class _Placed:
    """Keys compacted to their real tokens (rank order) and queries put in the rank slots of the blocks
    ``first_block ..`` they fall in, so that every row's blocks line up."""

    q: torch.Tensor  # [B, nq * s, H, Dk] queries by rank slot (zeros where no query of this call)
    k: torch.Tensor  # [B, Tk, H, Dk] real keys first, in order
    v: torch.Tensor  # [B, Tk, H, Dv]
    valid: torch.Tensor | None  # [B, Tk] the first count_b rows are real; None: all are
    first_block: int
    slot: torch.Tensor | None  # [B, Tq] rank slot of each query (None: query i is slot i + lead)
    lead: int
    real_q: torch.Tensor | None  # [B, Tq] queries at real positions
    tq: int

    def unplace(self, out: torch.Tensor) -> torch.Tensor:
        """``[B, slots, H, Dv]`` by rank slot -> ``[B, Tq, H, Dv]`` by query; padded queries get 0."""
        if self.slot is None:
            return out[:, self.lead : self.lead + self.tq]
        idx = self.slot.clamp(max=out.shape[1] - 1)[:, :, None, None].expand(-1, -1, *out.shape[2:])
        got = out.gather(1, idx)
        return torch.where(self.real_q[:, :, None, None], got, torch.zeros((), dtype=out.dtype, device=out.device))


def _place(x: AttentionInputs, q, k, v, s: int) -> _Placed | None:
    """Arrange q, k, v by rank among real tokens (see :class:`_Placed`); None when no query is real."""
    kpm = x.key_padding_mask
    if kpm is None:  # ranks are positions: pad the queries to whole blocks
        first = x.q_offset // s
        lead = x.q_offset - first * s
        tail = -(lead + x.tq) % s
        qp = F.pad(q, (0, 0, 0, 0, lead, tail))
        return _Placed(qp, k, v, None, first, None, lead, None, x.tq)
    order = torch.sort((~kpm).to(torch.uint8), dim=1, stable=True).indices  # [B, Tk]: real positions first
    gather_rows = lambda t: t.gather(1, order[:, :, None, None].expand_as(t))  # noqa: E731
    count = kpm.sum(dim=1, keepdim=True)  # [B, 1]
    valid = torch.arange(x.tk, device=kpm.device) < count  # [B, Tk]
    real_q = kpm[:, x.q_offset :]  # [B, Tq]
    if not real_q.any():
        return None
    rank_q = (kpm.long().cumsum(dim=1) - 1)[:, x.q_offset :]  # [B, Tq]
    first = int(rank_q[real_q].min()) // s
    last = int(rank_q[real_q].max()) // s
    slots = (last - first + 1) * s
    slot = torch.where(real_q, rank_q - first * s, slots)  # padded queries go to a spare slot, dropped below
    qp = q.new_zeros(x.batch, slots + 1, *q.shape[2:])
    qp = qp.scatter(1, slot[:, :, None, None].expand_as(q), q)[:, :slots]
    return _Placed(qp, gather_rows(k), gather_rows(v), valid, first, slot, 0, real_q, x.tq)


@dataclass(frozen=True)
class _Summaries:
    k: torch.Tensor  # [B, H, nb, Dk] mean keys of the blocks
    v: torch.Tensor  # [B, H, nb, Dv] mean values
    counts: torch.Tensor  # [B, nb] real tokens per block
    first: int  # block id of query block 0
    causal: bool


def _attend_blocks(qb, kb, vb, valid, summ: _Summaries, start: int, scale: float) -> torch.Tensor:
    """Query blocks ``start ..`` of the call: ``qb [B, H, n, s, Dk]`` against their own block's keys ``kb``
    (real where ``valid [B, n, s]``) and every block summary, under one softmax -> ``[B, H, n, s, Dv]``."""
    b, h, n, s, _ = qb.shape
    nb = summ.counts.shape[1]
    own = qb @ kb.transpose(-1, -2) * scale  # [B, H, n, s, s]
    far = (qb.flatten(2, 3) @ summ.k.transpose(-1, -2)).view(b, h, n, s, nb) * scale
    far = far + summ.counts.clamp(min=1).log()[:, None, None, None, :]  # a summary stands for n_r keys

    own_seen = valid[:, None, :, None, :]  # [B, 1, n, 1, s]
    if summ.causal:  # query slot i of a block comes after key slot j of the same block when j <= i
        own_seen = own_seen & torch.ones(s, s, dtype=torch.bool, device=qb.device).tril()
    block_id = torch.arange(nb, device=qb.device)
    query_block = torch.arange(n, device=qb.device)[:, None] + summ.first + start  # [n, 1]
    far_seen = block_id < query_block if summ.causal else block_id != query_block  # [n, nb]
    far_seen = far_seen[None, None, :, None, :] & (summ.counts > 0)[:, None, None, None, :]  # [B, 1, n, 1, nb]

    rows = (b, 1, n, s)
    seen = torch.cat([own_seen.expand(*rows, s), far_seen.expand(*rows, nb)], dim=-1)
    probs = masked_softmax(torch.cat([own, far], dim=-1), seen)  # [B, H, n, s, s + nb]
    out = probs[..., :s] @ vb  # [B, H, n, s, Dv]
    return out + (probs[..., s:].flatten(2, 3) @ summ.v).view(b, h, n, s, -1)
