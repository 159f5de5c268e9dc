"""``lasp2``: kernel (linear) and decay attention over ranks with ONE all-gather of chunk states (LASP-2,
arXiv 2502.07563; research/C_kernels_distributed.md §3.4).

Every rank cuts its tokens into the layout's pieces (one for contiguous, two for zigzag), each a run of consecutive
global positions ``s .. e``, and computes per piece, from zero, with the mechanism's own features and chunked scan:

    M_p = sum_{j in p} g^(e_p - j) phi(k_j) [v_j, 1]        (the state at the end of the piece; the 1: normaliser)
    N_p = sum_{j in p} g^(j - s_p) phi(k_j) [v_j, 1]        (noncausal decay only: the state seen from its start)

One all-gather brings every piece's states to every rank. A query i of piece r then adds what other pieces leave:

    causal:            S_r = sum_{p: e_p < s_r} g^(s_r - 1 - e_p) M_p,    out_i += g^(i - s_r + 1) phi(q_i) S_r
    noncausal decay:   and U_r = sum_{p: s_p > e_r} g^(s_p - 1 - e_r) N_p,  out_i += g^(e_r + 1 - i) phi(q_i) U_r
    noncausal:         out_i = phi(q_i) sum_p M_p                         (no decay)

to the piece's own causal (or bidirectional) result, and normalises at the end. g is the per-head decay (1 for
kernels without one). The backward of the all-gather is one reduce-scatter (``_collectives.all_gather``).
Global positions reach position-dependent features (cosformer) through the piece's offset.
"""

from __future__ import annotations

import logging

import torch

from ..errors import InvalidOption
from ..inputs import AttentionInputs
from ..mechanism import Mechanism
from ..mechanisms._kernel_base import KernelAttention
from ..ops.chunked import causal_linear_scan
from ..patterns import Pattern
from ..state import State
from ._collectives import all_gather, every_rank, tie
from ._pieces import Piece, world_pieces
from .api import CPCall, Strategy, register_strategy

log = logging.getLogger(__name__)

# mechanisms whose whole computation is KernelAttention's phi(q) S / (phi(q) z) with the states above, checked
# against one process in tests/test_distributed_lasp2.py
SUPPORTED = ("linear", "performer", "cosformer", "hedgehog", "retention", "lightning")


@register_strategy
class LASP2(Strategy):
    name = "lasp2"
    summary = "linear and decay families: one all-gather of chunk states (LASP-2)"

    def refuses(
        self, mech: Mechanism, pattern: Pattern, *, layout: str, world: int, total: int, heads: int, kv_heads: int
    ):
        if not isinstance(mech, KernelAttention):
            return f"{mech.name} is not a kernel (linear) or decay mechanism"
        if mech.name not in SUPPORTED:
            return f"{mech.name} is not among the kernel mechanisms checked with LASP-2 ({', '.join(SUPPORTED)})"
        return None

    def run(self, call: CPCall) -> torch.Tensor:
        mech: KernelAttention = call.mech  # type: ignore[assignment]
        _check_same_draws(call)
        x = _local_inputs(call)
        everyone = world_pieces(call.total, call.world, call.layout)
        mine = everyone[call.rank]
        parts = [_piece_terms(mech, x, p, call.pattern) for p in mine]
        states = torch.stack([part.states for part in parts])  # [P, K, B, Hkv, F, Dv'] K = 1 or 2 (M, N)
        gathered = all_gather(states, call.group, call.world, call.timeout)  # [W, P, K, B, Hkv, F, Dv']
        outs = [_with_other_pieces(part, gathered, everyone, call.pattern) for part in parts]
        return mech._finish(tie(torch.cat(outs, dim=1), gathered), x)  # [B, n, Hq, Dv]


def _local_inputs(call: CPCall) -> AttentionInputs:
    """This rank's inputs as the mechanism sees them (k, v repeated to the query heads where it keeps a state per
    query head), after the mechanism's own checks for the WHOLE sequence (e.g. cosformer's max_len)."""
    mech = call.mech
    x = AttentionInputs(q=call.q, k=call.k, v=call.v, pattern=call.pattern, scale=call.scale,
                        key_padding_mask=call.key_padding_mask, state=None, want_state=False)  # fmt: skip
    whole = lambda t: torch.empty(t.shape[0], call.total, *t.shape[2:], device="meta")  # noqa: E731
    mech.check_call(x.replace(q=whole(x.q), k=whole(x.k), v=whole(x.v), key_padding_mask=None))
    x, _ = mech.join_cache(x)  # decay family: k, v per query head
    per_query_head = getattr(mech, "per_query_head", None)  # hedgehog: a feature map per query head
    return per_query_head(x) if per_query_head is not None else x


def _check_same_draws(call: CPCall) -> None:
    """A mechanism with random features (performer) must draw the same on every rank, or each rank's states mean
    something else: compare the draw seeds (one small all-gather, only for such mechanisms)."""
    seed = getattr(call.mech, "draw_seed", None)
    if seed is None or call.world == 1:
        return
    seeds = every_rank(int(seed), call.group, call.world, call.timeout)
    if len(set(seeds)) > 1:
        raise InvalidOption(
            f"{call.mech.name} draws its random features from a different seed on each rank ({seeds}): create it "
            f"with the same seed=... on every rank (or load the same state_dict)"
        )


class _PieceTerms:
    """One piece's features, own result (before normalising) and states to share."""

    def __init__(self, piece: Piece, phi_q, out, states, log_g):
        self.piece, self.phi_q, self.out, self.states, self.log_g = piece, phi_q, out, states, log_g


def _piece_terms(mech: KernelAttention, x: AttentionInputs, piece: Piece, pattern: Pattern) -> _PieceTerms:
    sl = piece.local
    mask = None if x.key_padding_mask is None else x.key_padding_mask[:, sl]
    # the offset puts the piece at its global positions (KernelAttention.positions reads state.offset)
    xp = x.replace(q=x.q[:, sl], k=x.k[:, sl], v=x.v[:, sl], key_padding_mask=mask, state=State(offset=piece.start))
    phi_q, phi_k = mech.features(xp, "q"), mech._phi_k(xp)  # [B, c, Hq, F], [B, c, Hkv, F] (padded keys: 0)
    vals = mech._values(xp, phi_q.dtype)  # [B, c, Hkv, Dv(+1)]
    log_g = mech.log_decay(xp)  # [Hkv] or None
    if pattern is Pattern.NONCAUSAL_SELF and log_g is None:  # no order: every key counts the same
        total = torch.einsum("bkhf,bkhe->bhfe", phi_k, vals)
        return _PieceTerms(piece, phi_q, None, total[None], None)
    chunk = mech.chunk_size()
    out, m = causal_linear_scan(phi_q, phi_k, vals, chunk=chunk, log_decay=log_g)  # out [B, c, Hq, Dv'], m: M_p
    if pattern is Pattern.CAUSAL_SELF:
        return _PieceTerms(piece, phi_q, out, m[None], log_g)
    back, n = causal_linear_scan(phi_q.flip(1), phi_k.flip(1), vals.flip(1), chunk=chunk, log_decay=log_g)
    g = phi_q.shape[2] // phi_k.shape[2]
    diag = (phi_q * phi_k.repeat_interleave(g, 2)).sum(-1, keepdim=True) * vals.repeat_interleave(g, 2)
    return _PieceTerms(piece, phi_q, out + back.flip(1) - diag, torch.stack([m, n]), log_g)  # both scans count i = j


def _with_other_pieces(part: _PieceTerms, gathered: torch.Tensor, everyone: list[list[Piece]], pattern: Pattern):
    """The piece's output (numerator and normaliser columns) with every other piece's contribution added."""
    me = part.piece
    if part.out is None:  # noncausal, no decay: the sum of all states
        return _read(part.phi_q, gathered[:, :, 0].sum(dim=(0, 1)), None)
    others = [(r, i, p) for r, ps in enumerate(everyone) for i, p in enumerate(ps)]
    before = [(r, i, me.start - 1 - p.end) for r, i, p in others if p.end < me.start]
    out = part.out + _read(part.phi_q, _decayed_sum(gathered, before, 0, part.log_g), _carry(part, forward=True))
    if pattern is Pattern.NONCAUSAL_SELF:  # decay both ways: the pieces after this one, seen from their start
        after = [(r, i, p.start - 1 - me.end) for r, i, p in others if p.start > me.end]
        out = out + _read(part.phi_q, _decayed_sum(gathered, after, 1, part.log_g), _carry(part, forward=False))
    return out


def _decayed_sum(gathered: torch.Tensor, which: list[tuple[int, int, int]], kind: int, log_g):
    """``sum g^gap * state`` over ``(rank, piece, gap)``: ``[B, Hkv, F, Dv']`` (zeros when none)."""
    total = torch.zeros_like(gathered[0, 0, kind])
    for rank, index, gap in which:
        weight = 1.0 if log_g is None else torch.exp(log_g * gap)[None, :, None, None]  # [1, Hkv, 1, 1]
        total = total + weight * gathered[rank, index, kind]
    return total


def _carry(part: _PieceTerms, forward: bool) -> torch.Tensor | None:
    """Decay from the piece's edge to each query ``[c, Hkv]``: g^(t+1) from its start, g^(c-t) from its end."""
    if part.log_g is None:
        return None
    c = part.piece.length
    t = torch.arange(c, device=part.log_g.device, dtype=part.log_g.dtype)
    steps = t + 1 if forward else c - t
    return torch.exp(steps[:, None] * part.log_g[None, :])


def _read(phi_q: torch.Tensor, state: torch.Tensor, carry: torch.Tensor | None) -> torch.Tensor:
    """``carry * phi(q) . state``: ``phi_q [B, c, Hq, F]``, ``state [B, Hkv, F, Dv']`` -> ``[B, c, Hq, Dv']``."""
    b, c, hq, f = phi_q.shape
    hkv = state.shape[1]
    grouped = phi_q.reshape(b, c, hkv, hq // hkv, f)  # [B, c, Hkv, G, F] (features may be a strided view)
    out = torch.einsum("bqhgf,bhfe->bqhge", grouped, state)  # [B, c, Hkv, G, Dv']
    if carry is not None:
        out = out * carry[None, :, :, None, None]
    return out.flatten(2, 3)
