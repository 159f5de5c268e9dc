"""``halo``: sliding-window attention over ranks — only the window's worth of keys moves (research §8.4).

Query i sees keys j with ``0 <= i - j < w`` (causal) or ``|i - j| < w`` (noncausal). Each of a rank's pieces (the
layout's chunks: one, or two for zigzag) needs the ``w - 1`` keys before its start and, noncausal, the ``w - 1``
after its end; they lie in the neighbouring chunks, held by rank-1, rank+1 or the rank itself (zigzag's last rank
holds chunks W-1 and W). One two-way P2P hop (``_collectives.exchange``) carries every halo (k, v and the padding
mask in one message); the gradients of the halo keys go back the same way. Each piece then attends
``[halo before | piece | halo after]`` with the mechanism's banded kernel (``ops.banded``), exactly as one
process would. A window longer than a chunk would need keys from further ranks: refused, pointing to ``ring``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..mechanism import Mechanism
from ..ops.banded import banded_attention
from ..patterns import Pattern
from ._collectives import exchange, tie
from ._pieces import Piece, world_pieces
from .api import CPCall, Strategy, register_strategy

KINDS = ("before", "after")  # a halo before a piece's start (its previous chunk's tail), after its end (next's head)


@register_strategy
class Halo(Strategy):
    name = "halo"
    summary = "sliding window: one P2P hop each way of the window's w-1 keys"

    def refuses(
        self, mech: Mechanism, pattern: Pattern, *, layout: str, world: int, total: int, heads: int, kv_heads: int
    ):
        if mech.name != "sliding_window":
            return f"{mech.name} is not a sliding window (halo exchanges only a window's keys)"
        w, chunk = mech.options.window, world_pieces(total, world, layout)[0][0].length
        if w - 1 > chunk:
            return (
                f"window={w} needs the {w - 1} keys before each query, more than one {layout} chunk of {chunk} tokens "
                f"(T={total}, W={world}): use strategy='ring', or layout='contiguous' (chunks of T/W), or fewer ranks"
            )
        return None

    def run(self, call: CPCall) -> torch.Tensor:
        w = call.mech.options.window
        everyone = world_pieces(call.total, call.world, call.layout)
        causal = call.pattern is Pattern.CAUSAL_SELF
        kinds = KINDS[:1] if causal else KINDS
        b, n = call.q.shape[:2]
        real = call.key_padding_mask if call.key_padding_mask is not None else call.q.new_ones(b, n, dtype=torch.bool)
        rows = torch.cat(
            [call.k, call.v, real[:, :, None, None].expand(-1, -1, call.k.shape[2], 1).to(call.k.dtype)], dim=-1
        )  # fmt: skip  [B, n, Hkv, Dk + Dv + 1]: what a halo carries
        halos, received = _halos(rows, w - 1, everyone, call, kinds)
        dk = call.k.shape[-1]
        outs = []
        for i, piece in enumerate(everyone[call.rank]):
            before = halos[(i, "before")]
            after = halos.get((i, "after"), rows[:, :0])
            keys = torch.cat([before, rows[:, piece.local], after], dim=1)  # [B, h + c + h', Hkv, Dk + Dv + 1]
            out = banded_attention(
                call.q[:, piece.local], keys[..., :dk], keys[..., dk:-1], before=w - 1, after=0 if causal else w - 1,
                scale=call.scale, q_offset=before.shape[1], key_padding_mask=keys[:, :, 0, -1] > 0.5,
            )  # fmt: skip
            outs.append(out)
        return tie(torch.cat(outs, dim=1), *received)  # [B, n, Hq, Dv]


@dataclass(frozen=True)
class _Need:
    """Piece ``piece`` of rank ``rank`` needs a halo of ``kind`` from piece ``src_piece`` of rank ``src`` (or
    nothing: ``src`` None at the ends of the sequence)."""

    rank: int
    piece: int
    kind: str
    src: int | None
    src_piece: int | None


def _needs(everyone: list[list[Piece]], kinds: tuple[str, ...]) -> list[_Need]:
    """Every halo every rank needs, in one order all ranks agree on."""
    by_end = {p.end: (r, i) for r, ps in enumerate(everyone) for i, p in enumerate(ps)}
    by_start = {p.start: (r, i) for r, ps in enumerate(everyone) for i, p in enumerate(ps)}
    needs = []
    for r, ps in enumerate(everyone):
        for i, p in enumerate(ps):
            for kind in kinds:
                src = by_end.get(p.start - 1) if kind == "before" else by_start.get(p.end + 1)
                needs.append(_Need(r, i, kind, *(src if src else (None, None))))
    return needs


def _halos(rows: torch.Tensor, h: int, everyone: list[list[Piece]], call: CPCall, kinds: tuple[str, ...]) -> dict:
    """``{(my piece, kind): [B, h, Hkv, C]}``: the halos of this rank's pieces, from itself or one hop away; and what
    the hop received (to tie into the output: every rank must run the hop's backward)."""
    me, mine = call.rank, everyone[call.rank]
    needs = _needs(everyone, kinds)

    def edge(src_piece: int, kind: str) -> torch.Tensor:  # what a piece gives: its tail (to the piece after it)
        sl = mine[src_piece].local
        return rows[:, sl][:, -h:] if kind == "before" else rows[:, sl][:, :h]

    def sends(to: int) -> list[_Need]:
        return [nd for nd in needs if nd.rank == to and nd.src == me]

    hops = [(nd.rank, nd.src - nd.rank) for nd in needs if nd.src is not None and nd.src != nd.rank]  # (to, -1/+1)
    slots = max([hops.count((r, d)) for r in range(call.world) for d in (-1, 1)])
    backward = any(d == 1 for _, d in hops)  # some halo travels to rank-1 (noncausal, or zigzag's second chunks)
    # [B, h, Hkv, C] zeros joined to rows: a rank that sends nothing real (the last, causal) still sends something
    # that needs a gradient, so it runs the hop's backward that its neighbour waits for
    empty = rows[:, :h] * 0

    def bundle(to: int) -> torch.Tensor:  # [slots, B, h, Hkv, C], padded with zeros to the same size everywhere
        parts = [edge(nd.src_piece, nd.kind) for nd in sends(to)]
        return torch.stack(parts + [empty] * (slots - len(parts))) if slots else empty[None]

    halos, received = {}, ()
    if slots and h:
        to_prev = bundle(me - 1) if backward else None
        got_prev, got_next = received = exchange(to_prev, bundle(me + 1), call.group, me, call.world, call.timeout)
    for nd in (nd for nd in needs if nd.rank == me):
        if nd.src is None or h == 0:
            halo = empty  # before the sequence's start or after its end: no keys (padding, never seen)
        elif nd.src == me:
            halo = edge(nd.src_piece, nd.kind)
        else:
            got = got_prev if nd.src == me - 1 else got_next
            halo = got[[x for x in needs if x.rank == me and x.src == nd.src].index(nd)]
        halos[(nd.piece, nd.kind)] = halo
    return halos, received
