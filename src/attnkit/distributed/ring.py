"""The ``ring`` strategy: softmax-family attention with K/V rotating around the ranks (research §1.2-§1.5).

Every rank keeps its queries. W times, it attends them to the K/V block it holds (its own first, then the one rank
r - s sent), merges the block's (out, lse) into its running result in fp32 (:func:`_common.merge_`, in place), and
passes the block on with one ``batch_isend_irecv``: W - 1 rotations forward. Backward recomputes nothing from
autograd: each block's backward gets the MERGED out and lse (its weights are then the global ones), dQ stays home,
and dK/dV travel with their block, coming home after W hops (two tags: K/V and dK/dV move at once).

Which blocks and pairs are computed follows from global positions alone (``call.positions`` of each rank): a block
whose keys all lie after the queries (causal) or out of the window is skipped, a block visible in full runs without
a mask, the diagonal block runs the kernel's causal flag, and anything else gets a pair mask from the positions. With
``zigzag`` every rank then computes the same amount causally (chunk r and 2W-1-r); with ``contiguous`` causal rank r
skips the W-1-r blocks of later ranks. Key padding masks keys per block (gathered once, B*T bools); a rank whose keys
are all padding sends blocks no one computes.

Mechanisms: ``softmax``; ``sliding_window`` (the window as a pair mask on global positions: any window; ``halo`` is
cheaper when the window fits in a shard); ``complex`` (its rotation of q and k by absolute position is applied here
with the global positions, then it is softmax attention, k and v per query head).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..errors import ShapeError
from ..mechanism import Mechanism
from ..ops.gqa import repeat_kv
from ..patterns import Pattern
from . import faults
from ._collectives import all_gather_flat
from ._common import BlockMask, block_backward, block_forward, merge_, stats_dtype
from .api import CPCall, Strategy, register_strategy
from .layout import positions

log = logging.getLogger(__name__)

MECHANISMS = ("softmax", "sliding_window", "complex")
_WHY_NOT = {
    "gaussian": "gaussian re-weights each score by its row's mean and variance over all keys, not a per-pair bias "
    "a ring block can apply",
}
TAG_KV, TAG_DKV = 11, 12  # K/V and dK/dV rotate at once in backward: one tag each


@dataclass
class Traffic:
    """What the ring sent since ``reset``: point-to-point exchanges (one send + one receive each) and bytes sent.
    ``CommDebugMode`` does not see ``batch_isend_irecv``; tests and ``attnkit bench cp`` read this instead."""

    exchanges: int = 0
    bytes_sent: int = 0
    by_tag: dict[int, int] = field(default_factory=dict)

    def reset(self) -> None:
        self.exchanges, self.bytes_sent, self.by_tag = 0, 0, {}


TRAFFIC = Traffic()


# ---- which pairs a block computes -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Visibility:
    """Query at global position p sees key at position t when ``t <= p`` (causal) and ``|p - t| < window``."""

    causal: bool
    window: int | None = None

    def _seen_distances(self) -> tuple[float, float]:
        """The range of p - t that is visible."""
        reach = float("inf") if self.window is None else self.window - 1
        return (0.0 if self.causal else -reach), reach

    def classify(self, q_lo: int, q_hi: int, k_lo: int, k_hi: int) -> str:
        """``full``, ``skip`` or ``partial`` for queries at positions [q_lo, q_hi] and keys at [k_lo, k_hi]."""
        lo, hi = self._seen_distances()
        d_min, d_max = q_lo - k_hi, q_hi - k_lo
        if lo <= d_min and d_max <= hi:
            return "full"
        return "skip" if d_max < lo or d_min > hi else "partial"

    def pairs(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """``[Sq, Sk]`` bool: the visible pairs."""
        d = q_pos[:, None] - k_pos[None, :]
        lo, hi = self._seen_distances()
        return (d >= lo) & (d <= hi)


@dataclass(frozen=True)
class Block:
    """The rectangle of one step: local query rows x source key columns, and how its pairs are masked."""

    rows: slice
    cols: slice
    kind: str  # full | causal | pairs

    def mask(self, vis: Visibility, q_pos: torch.Tensor, k_pos: torch.Tensor, keys: torch.Tensor | None) -> BlockMask:
        pairs = vis.pairs(q_pos[self.rows], k_pos[self.cols]) if self.kind == "pairs" else None
        return BlockMask(causal=self.kind == "causal", pairs=pairs, keys=None if keys is None else keys[:, self.cols])


def runs(pos: torch.Tensor) -> list[tuple[int, int, int, int]]:
    """Maximal runs of consecutive positions in ``pos`` [n]: (local start, local stop, first position, last)."""
    cut = [0, *((torch.nonzero(pos.diff() != 1).flatten() + 1).tolist()), pos.numel()]
    return [(a, b, int(pos[a]), int(pos[b - 1])) for a, b in zip(cut[:-1], cut[1:], strict=True)]


def plan_block(vis: Visibility, q_pos: torch.Tensor, k_pos: torch.Tensor) -> Block | None:
    """The smallest rectangle holding every visible pair of these queries and keys (None: no pair is visible)."""
    kinds = {(qi, ki): vis.classify(q[2], q[3], k[2], k[3]) for qi, q in enumerate(runs(q_pos)) for ki, k in
             enumerate(runs(k_pos))}  # fmt: skip
    live = [pair for pair, kind in kinds.items() if kind != "skip"]
    if not live:
        return None
    q_runs, k_runs = runs(q_pos), runs(k_pos)
    qs, ks = sorted({qi for qi, _ in live}), sorted({ki for _, ki in live})
    rows, cols = slice(q_runs[qs[0]][0], q_runs[qs[-1]][1]), slice(k_runs[ks[0]][0], k_runs[ks[-1]][1])
    inside = [kinds[qi, ki] for qi in range(qs[0], qs[-1] + 1) for ki in range(ks[0], ks[-1] + 1)]
    if all(kind == "full" for kind in inside):
        return Block(rows, cols, "full")
    qp, kp = q_pos[rows], k_pos[cols]
    aligned = vis.causal and vis.window is None and torch.equal(qp, kp) and bool((qp.diff() > 0).all())
    return Block(rows, cols, "causal" if aligned else "pairs")


# ---- the ring ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RingSetup:
    """Everything the autograd Function needs besides q, k, v (heads first: ``[B, H, n, D]``)."""

    group: dist.ProcessGroup | None
    rank: int
    world: int
    scale: float
    vis: Visibility
    positions: list[torch.Tensor]  # [W] x [n]: each rank's global positions
    keys: list[torch.Tensor | None]  # [W] x [B, n] bool real keys per source rank (None: all real)
    blocks: list[Block | None]  # [W]: what step s computes (source rank r - s)
    timeout: float

    def source(self, step: int) -> int:
        return (self.rank - step) % self.world

    def block_mask(self, step: int) -> BlockMask:
        src = self.source(step)
        return self.blocks[step].mask(self.vis, self.positions[self.rank], self.positions[src], self.keys[src])


class _Shift:
    """One ring rotation in flight: ``sends`` go to rank r + 1 while same-sized tensors arrive from r - 1 (one
    ``batch_isend_irecv``: one exchange)."""

    def __init__(self, sends: list[torch.Tensor], setup: RingSetup, tag: int):
        self.recvs = [torch.empty_like(t) for t in sends]
        peer = (lambda r: r) if setup.group is None else (lambda r: dist.get_global_rank(setup.group, r))
        nxt, prv = peer((setup.rank + 1) % setup.world), peer((setup.rank - 1) % setup.world)
        ops = [dist.P2POp(dist.isend, t, nxt, group=setup.group, tag=tag) for t in sends]
        ops += [dist.P2POp(dist.irecv, t, prv, group=setup.group, tag=tag) for t in self.recvs]
        self.works = dist.batch_isend_irecv(ops)
        self.timeout = setup.timeout
        TRAFFIC.exchanges += 1
        TRAFFIC.bytes_sent += sum(t.numel() * t.element_size() for t in sends)
        TRAFFIC.by_tag[tag] = TRAFFIC.by_tag.get(tag, 0) + 1

    def wait(self) -> list[torch.Tensor]:
        for work in self.works:
            faults.wait(work, what="ring exchange of key/value blocks", timeout=self.timeout)
        return self.recvs


def _heads_first(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(1, 2)  # [B, n, H, D] <-> [B, H, n, D], a view


class RingAttention(torch.autograd.Function):
    """``q [B, n, Hq, Dk]``, ``k [B, n, Hkv, Dk]``, ``v [B, n, Hkv, Dv]`` (this rank's) -> out ``[B, n, Hq, Dv]``.

    Blocks are computed heads first on transposed views; K/V travel as the contiguous ``[B, n, H, D]`` tensors they
    are (no packing copy), and the output and gradients are built in that memory order (no copy at the end).
    """

    @staticmethod
    def forward(ctx, q, k, v, setup: RingSetup):
        stats = stats_dtype(q.dtype)
        out_t = q.new_zeros(*q.shape[:3], v.shape[-1], dtype=stats)  # [B, n, Hq, Dv]
        out, q_h = _heads_first(out_t), _heads_first(q)
        lse = q.new_full((q.shape[0], q.shape[2], q.shape[1]), float("-inf"), dtype=stats)  # [B, Hq, n]
        k, v = k.contiguous(), v.contiguous()
        held = [k, v]  # the K/V block this rank holds at this step
        for step in range(setup.world):
            shift = _Shift(held, setup, TAG_KV) if step < setup.world - 1 else None
            block = setup.blocks[step]
            if block is not None:
                kk, vv = (_heads_first(t) for t in held)
                r, c = block.rows, block.cols
                b_out, b_lse = block_forward(
                    q_h[:, :, r], kk[:, :, c], vv[:, :, c], setup.block_mask(step), setup.scale
                )
                merge_(out[:, :, r], lse[:, :, r], b_out, b_lse)
            if shift is not None:
                held = shift.wait()
        result = out_t.to(q.dtype)
        ctx.setup = setup
        ctx.save_for_backward(q, k, v, result, lse)
        return result

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        setup: RingSetup = ctx.setup
        stats = stats_dtype(q.dtype)
        q_h, out_h, dout_h = _heads_first(q), _heads_first(out), _heads_first(dout)
        dq_t = torch.zeros(q.shape, dtype=stats, device=q.device)
        dq = _heads_first(dq_t)
        held, travelling = [k, v], None  # travelling: the dK/dV of the block arriving from r - 1
        for step in range(setup.world):
            shift = _Shift(held, setup, TAG_KV) if step < setup.world - 1 else None
            block, g = setup.blocks[step], None
            if block is not None:
                kk, vv = (_heads_first(t) for t in held)
                r, c = block.rows, block.cols
                g = block_backward(dout_h[:, :, r], q_h[:, :, r], kk[:, :, c], vv[:, :, c], out_h[:, :, r],
                                   lse[:, :, r], setup.block_mask(step), setup.scale)  # fmt: skip
                dq[:, :, r] += g[0]
            # the held block's dK/dV so far (arrived from r - 1, or zero at the first step): this block's share adds in
            grads = travelling.wait() if travelling is not None else [torch.zeros_like(t, dtype=stats) for t in (k, v)]
            if g is not None:
                _heads_first(grads[0])[:, :, c] += g[1]
                _heads_first(grads[1])[:, :, c] += g[2]
            travelling = _Shift(grads, setup, TAG_DKV) if setup.world > 1 else None
            if shift is not None:
                held = shift.wait()
        dk, dv = travelling.wait() if travelling is not None else grads  # after W hops: this rank's own dK/dV
        return dq_t.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None


# ---- the strategy -----------------------------------------------------------------------------------------------


def _gather_keys(call: CPCall) -> list[torch.Tensor | None]:
    """Every rank's real-key mask ``[B, n]`` (None where all are real): one all-gather of B*T bytes, always made so
    that ranks with and without a mask still agree on the collectives."""
    b, n = call.q.shape[0], call.q.shape[1]
    mine = call.key_padding_mask if call.key_padding_mask is not None else torch.ones(b, n, dtype=torch.bool)
    mine = mine.to(device=call.q.device, dtype=torch.uint8).reshape(-1)
    if call.world == 1:
        every = mine.view(1, b, n)
    else:
        flat = torch.empty(call.world * mine.numel(), dtype=torch.uint8, device=mine.device)
        faults.collective(all_gather_flat, flat, mine, what="ring all-gather of the key padding", timeout=call.timeout,
                          group=call.group)  # fmt: skip  # gloo: a flat output, not [W, ...]
        every = flat.view(call.world, b, n)
    return [None if bool(m.all()) else m.bool() for m in every]


def _visibility(mech: Mechanism, pattern: Pattern) -> Visibility:
    window = mech.options.window if mech.name == "sliding_window" else None
    return Visibility(causal=pattern is Pattern.CAUSAL_SELF, window=window)


def _prepare(call: CPCall) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v as softmax attention sees them, ``[B, n, H, D]`` (complex: rotated by global position)."""
    mech = call.mech
    if mech.name != "complex":
        return call.q, call.k, call.v
    if call.q.shape[2] != mech.heads or call.q.shape[3] != mech.head_dim:
        raise ShapeError(
            f"complex was created for heads={mech.heads}, head_dim={mech.head_dim}; got q with "
            f"{tuple(call.q.shape[2:])}"
        )
    groups = call.q.shape[2] // call.k.shape[2]
    compute = torch.promote_types(call.q.dtype, torch.float32)
    q = mech.rotate(call.q.to(compute), call.positions).to(call.q.dtype)
    k = mech.rotate(repeat_kv(call.k, groups).to(compute), call.positions).to(call.k.dtype)
    return q, k, repeat_kv(call.v, groups)  # k is rotated per query head: k, v per query head


@register_strategy
class Ring(Strategy):
    name = "ring"
    summary = "K/V rotate around the ranks, log-sum-exp merge (softmax family; zigzag balances causal work)"

    def refuses(
        self, mech: Mechanism, pattern: Pattern, *, layout: str, world: int, total: int, heads: int, kv_heads: int
    ):
        if mech.name in MECHANISMS:
            return None
        why = _WHY_NOT.get(mech.name, f"{mech.name} is not softmax attention")
        return f"{why}; ring runs softmax-family mechanisms: {', '.join(MECHANISMS)}"

    def run(self, call: CPCall) -> torch.Tensor:
        q, k, v = _prepare(call)
        vis = _visibility(call.mech, call.pattern)
        every_pos = [positions(call.total, call.world, r, call.layout).to(q.device) for r in range(call.world)]
        keys = _gather_keys(call)
        blocks = []
        for step in range(call.world):
            src = (call.rank - step) % call.world
            dead = keys[src] is not None and not bool(keys[src].any())  # every key of that rank is padding
            blocks.append(None if dead else plan_block(vis, every_pos[call.rank], every_pos[src]))
        setup = RingSetup(call.group, call.rank, call.world, call.scale, vis, every_pos, keys, blocks, call.timeout)
        log.debug("ring rank %d: blocks %s", call.rank, blocks)
        return RingAttention.apply(q, k, v, setup)  # [B, n, Hq, Dv]
