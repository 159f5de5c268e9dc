"""``halo``: sliding-window and 1-D neighborhood attention over ranks — only the window's worth of keys moves
(research §8.4). A neighborhood's window shifts inwards at the sequence's ends (NATTEN), so it reaches (k-1)·d
positions on both sides; its exact window comes from the mechanism's own predicate on global positions.

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
        if mech.name not in ("sliding_window", "neighborhood"):
            return f"{mech.name} is not a sliding window or 1-D neighborhood (halo exchanges only a window's keys)"
        if mech.name == "neighborhood" and _neighborhood_rank(mech) != 1:
            return "neighborhood runs along the sequence axis only (1-D kernel_size, dilation, is_causal)"
        reach, chunk = max(_reach(mech, pattern)), world_pieces(total, world, layout)[0][0].length
        if reach > chunk:
            return (
                f"{mech.name} needs keys up to {reach} positions away, more than one {layout} chunk of {chunk} tokens "
                f"(T={total}, W={world}): use strategy='ring', or layout='contiguous' (chunks of T/W), or fewer ranks"
            )
        return None

    def run(self, call: CPCall) -> torch.Tensor:
        before_reach, after_reach = _reach(call.mech, call.pattern)
        everyone = world_pieces(call.total, call.world, call.layout)
        kinds = KINDS if after_reach else KINDS[:1]
        b, n = call.q.shape[:2]
        real = call.key_padding_mask if call.key_padding_mask is not None else call.q.new_ones(b, n, dtype=torch.bool)
        rows = torch.cat(
            [call.k, call.v, real[:, :, None, None].expand(-1, -1, call.k.shape[2], 1).to(call.k.dtype)], dim=-1
        )  # fmt: skip  [B, n, Hkv, Dk + Dv + 1]: what a halo carries
        halos, received = _halos(rows, max(before_reach, after_reach), everyone, call, kinds)
        window = _window(call)  # which (query, key) pairs of the band are seen, in global positions (None: all)
        dk = call.k.shape[-1]
        outs = []
        for i, piece in enumerate(everyone[call.rank]):
            before = halos[(i, "before")]
            after = halos.get((i, "after"), rows[:, :0])
            keys = torch.cat([before, rows[:, piece.local], after], dim=1)  # [B, h + c + h', Hkv, Dk + Dv + 1]
            first_key = piece.start - before.shape[1]  # global position of keys[:, 0]
            pairs = None if window is None else (lambda qi, kj, s=piece.start, f=first_key: window(qi + s, kj + f))
            out = banded_attention(
                call.q[:, piece.local], keys[..., :dk], keys[..., dk:-1], before=before_reach, after=after_reach,
                scale=call.scale, q_offset=before.shape[1], key_padding_mask=keys[:, :, 0, -1] > 0.5, pair_mask=pairs,
            )  # fmt: skip
            outs.append(out)
        return tie(torch.cat(outs, dim=1), *received)  # [B, n, Hq, Dv]


def _neighborhood_rank(mech: Mechanism) -> int:
    """The grid rank a neighborhood's options fix (1 when every option is one value or a 1-tuple)."""
    opts = (mech.options.kernel_size, mech.options.dilation, mech.options.is_causal)
    ranks = {len(o) for o in opts if isinstance(o, tuple)}
    return ranks.pop() if len(ranks) == 1 else (1 if not ranks else 0)


def _one(value):
    return value[0] if isinstance(value, tuple) else value


def _reach(mech: Mechanism, pattern: Pattern) -> tuple[int, int]:
    """How far before and after a query its keys can lie: a sliding window's w-1; a neighborhood's (k-1)·d on
    both sides (its window shifts inwards at the sequence's ends), only before when causal."""
    if mech.name == "sliding_window":
        w = mech.options.window
        return w - 1, 0 if pattern is Pattern.CAUSAL_SELF else w - 1
    reach = (_one(mech.options.kernel_size) - 1) * _one(mech.options.dilation)
    causal = pattern is Pattern.CAUSAL_SELF or bool(_one(mech.options.is_causal))
    return reach, 0 if causal else reach


def _window(call: CPCall):
    """A neighborhood's exact window on global positions (the mechanism's own predicate over the whole
    sequence); None for a sliding window, whose band is already exact."""
    if call.mech.name != "neighborhood":
        return None
    pred = call.mech.mask_predicate(call.pattern, (call.total,))
    zero = torch.zeros((), dtype=torch.long, device=call.q.device)
    return lambda i, j: pred(zero, zero, i, j)


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
