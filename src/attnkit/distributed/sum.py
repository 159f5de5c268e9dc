"""``sum``: sigmoid attention over ranks — partial outputs over key pieces simply add (research §0.3).

    out_i = sum_j sigmoid(scale q_i . k_j + b_i) v_j  =  sum over key pieces P of  sum_{j in P} (...)

Sigmoid weights have no row normaliser, so the output of a query piece is the plain sum of its partial outputs
against every key piece it can see (a piece wholly before it, or itself under the causal diagonal; a piece after
it is skipped in causal_self). Keys and values come from one differentiable all-gather (backward: one
reduce-scatter), the key padding mask from one more. The bias ``b_i = -log(n_i)`` counts the keys query i sees in
the WHOLE sequence (real keys at global positions <= i in causal_self), unless the mechanism has a fixed ``bias``.
Each partial output is the mechanism's own tiled kernel (``ops.tiled_sigmoid``: no T x T tensor, forward or
backward).
"""

from __future__ import annotations

import torch

from ..mechanism import Mechanism
from ..ops.gqa import repeat_kv
from ..ops.reference import compute_dtype
from ..ops.tiled_sigmoid import tiled_sigmoid_attention
from ..patterns import Pattern
from ._collectives import all_gather, tie
from ._pieces import Piece, world_pieces
from .api import CPCall, Strategy, register_strategy


@register_strategy
class SumStrategy(Strategy):
    name = "sum"
    summary = "sigmoid attention: partial outputs over key shards add (no normaliser to merge)"

    def refuses(
        self, mech: Mechanism, pattern: Pattern, *, layout: str, world: int, total: int, heads: int, kv_heads: int
    ):
        if mech.name != "sigmoid":
            return f"{mech.name} has a normaliser or other coupling: partial outputs add only for sigmoid attention"
        return None

    def run(self, call: CPCall) -> torch.Tensor:
        b, n, hq, _ = call.q.shape
        cdt = compute_dtype(call.q.dtype)
        dk = call.k.shape[-1]
        kv = torch.cat([call.k, call.v], dim=-1).to(cdt)  # [B, n, Hkv, Dk + Dv]: one all-gather for both
        every_kv = all_gather(kv, call.group, call.world, call.timeout)  # [W, B, n, Hkv, Dk + Dv]
        every_real = _gather_mask(call, b, n)  # [W, B, n] bool
        everyone = world_pieces(call.total, call.world, call.layout)

        def heads_first(t: torch.Tensor) -> torch.Tensor:  # [B, m, H, D] -> [B*H, m, D]
            return t.transpose(1, 2).reshape(b * hq, t.shape[1], t.shape[3])

        q = heads_first(call.q.to(cdt)) * call.scale  # pre-scaled: s = q.k + bias
        keys = [heads_first(repeat_kv(every_kv[r, ..., :dk], hq // kv.shape[2])) for r in range(call.world)]
        values = [heads_first(repeat_kv(every_kv[r, ..., dk:], hq // kv.shape[2])) for r in range(call.world)]
        valid = [every_real[r][:, None, :].expand(b, hq, n).reshape(b * hq, n) for r in range(call.world)]
        bias = _bias(call, every_real, everyone, cdt)  # [B, n]
        bias = bias[:, None, :].expand(b, hq, n).reshape(b * hq, n)
        outs = []
        for mine in everyone[call.rank]:
            sl = mine.local
            partial = [
                tiled_sigmoid_attention(
                    q[:, sl],
                    keys[r][:, p.local],
                    values[r][:, p.local],
                    bias[:, sl],
                    valid=valid[r][:, p.local],
                    causal_offset=offset,
                )  # fmt: skip
                for r, ps in enumerate(everyone)
                for p in ps
                if (offset := _causal_offset(mine, p, call.pattern)) != "unseen"
            ]
            outs.append(torch.stack(partial).sum(0))  # [B*H, c, Dv]: the partial outputs add
        out = torch.cat(outs, dim=1).view(b, hq, n, -1).transpose(1, 2)  # [B, n, Hq, Dv]
        return tie(out, every_kv).to(call.q.dtype).contiguous()


def _causal_offset(query: Piece, key: Piece, pattern: Pattern):
    """``tiled_sigmoid_attention``'s causal_offset for a query piece against a key piece: None (every key seen),
    0 (the same piece: the diagonal), or "unseen" (a later piece in causal_self). Pieces never overlap."""
    if pattern is not Pattern.CAUSAL_SELF or key.end < query.start:
        return None
    return 0 if key.start == query.start else "unseen"


def _gather_mask(call: CPCall, b: int, n: int) -> torch.Tensor:
    """Every rank's key padding mask ``[W, B, n]`` (all True when no rank has one: attend masks on all or none)."""
    if call.key_padding_mask is None:
        return torch.ones(call.world, b, n, dtype=torch.bool, device=call.q.device)
    real = call.key_padding_mask.to(torch.uint8)  # gloo gathers no bool
    return all_gather(real, call.group, call.world, call.timeout).bool()


def _bias(call: CPCall, every_real: torch.Tensor, everyone: list[list[Piece]], cdt: torch.dtype) -> torch.Tensor:
    """``b_i`` ``[B, n]``: the fixed option, or -log(real keys query i sees in the whole sequence)."""
    fixed = call.mech.options.bias
    b, n = every_real.shape[1:]
    if fixed is not None:
        return torch.full((b, n), float(fixed), dtype=cdt, device=call.q.device)
    if call.pattern is not Pattern.CAUSAL_SELF:
        counts = every_real.sum(dim=(0, 2))[:, None].expand(b, n)
    else:
        in_order = torch.zeros(b, call.total, dtype=torch.int64, device=call.q.device)  # [B, T] global order
        for r, ps in enumerate(everyone):
            for p in ps:
                in_order[:, p.start : p.end + 1] = every_real[r][:, p.local].long()
        counts = in_order.cumsum(dim=1)[:, call.positions]  # real keys at global positions <= each query's
    return -torch.log(counts.to(cdt).clamp(min=1))
