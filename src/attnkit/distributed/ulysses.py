"""Ulysses (DeepSpeed-Ulysses, arXiv:2309.14509): all-to-all from sequence shards to head shards and back.

Each rank holds ``n = T / W`` tokens of every head. One all-to-all per tensor gives each rank every token of
``H / W`` heads (query heads ``[r·H/W, (r+1)·H/W)`` and their kv heads, so GQA groups stay together); the
mechanism then runs unchanged on the whole sequence, in global token order (the layout's order is undone after
the all-to-all and redone before the reverse one), and a last all-to-all brings the output back to sequence
shards. Exact for any mechanism whose heads are independent and identical (``Mechanism.heads_independent``);
needs ``Hq % W == 0`` and ``Hkv % W == 0``.

Communication (research §8.4), per rank and step, each all-to-all sending ``(W-1)/W`` of its input:
forward q, k, v and the output; backward their gradients — ``B·n·(Hq·Dk + Hkv·(Dk + Dv) + Hq·Dv)·(W-1)/W``
elements each way, plus one all-gather of the key padding mask when there is one.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..mechanism import Mechanism
from ..patterns import Pattern
from . import faults
from ._collectives import all_gather_flat
from .api import CPCall, Strategy, register_strategy
from .layout import order


class _AllToAll(torch.autograd.Function):
    """``[W, ...]`` chunks: chunk j goes to rank j, chunk i of the result came from rank i. The exchange is its own
    adjoint, so the backward pass is the same exchange of the gradient."""

    @staticmethod
    def forward(ctx, chunks: torch.Tensor, group, timeout: float, what: str) -> torch.Tensor:
        ctx.group, ctx.timeout, ctx.what = group, timeout, what
        return _exchange(chunks, group, timeout, what)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _exchange(grad, ctx.group, ctx.timeout, f"the backward of {ctx.what}"), None, None, None


def _exchange(chunks: torch.Tensor, group, timeout: float, what: str) -> torch.Tensor:
    send = chunks.contiguous()
    got = torch.empty_like(send)
    faults.collective(dist.all_to_all_single, got, send, what=what, timeout=timeout, group=group)
    return got


def _to_heads(x: torch.Tensor, call: CPCall, back: torch.Tensor, name: str) -> torch.Tensor:
    """``[B, n, H, D]`` this rank's tokens of every head -> ``[B, T, H/W, D]`` every token of this rank's heads,
    in global order."""
    b, n, h, d = x.shape
    w = call.world
    chunks = x.reshape(b, n, w, h // w, d).permute(2, 0, 1, 3, 4)  # [W, B, n, H/W, D]: chunk j for rank j
    got = _AllToAll.apply(chunks, call.group, call.timeout, f"ulysses all-to-all of {name}")  # chunk i: rank i's
    seq = got.permute(1, 0, 2, 3, 4).reshape(b, w * n, h // w, d)  # [B, T, H/W, D] in layout order (rank-major)
    return seq.index_select(1, back)  # global order


def _to_tokens(out: torch.Tensor, call: CPCall, perm: torch.Tensor) -> torch.Tensor:
    """``[B, T, H/W, Dv]`` (global order) -> ``[B, n, H, Dv]``: this rank's tokens of every head."""
    b, t, hw, dv = out.shape
    w, n = call.world, t // call.world
    chunks = out.index_select(1, perm).reshape(b, w, n, hw, dv).transpose(0, 1)  # [W, B, n, H/W, Dv]: rank i's
    got = _AllToAll.apply(chunks, call.group, call.timeout, "ulysses all-to-all of the output")  # head group j
    return got.permute(1, 2, 0, 3, 4).reshape(b, n, w * hw, dv)


def _full_mask(call: CPCall, back: torch.Tensor) -> torch.Tensor | None:
    """The whole sequence's key padding mask ``[B, T]`` in global order (one all-gather), or None."""
    if call.key_padding_mask is None:
        return None
    mine = call.key_padding_mask.t().contiguous().to(torch.uint8)  # [n, B]: gloo has no bool all-gather
    flat = torch.empty(call.world * mine.numel(), dtype=torch.uint8, device=mine.device)
    faults.collective(all_gather_flat, flat, mine.reshape(-1), what="ulysses all-gather of the key "
                      "padding mask", timeout=call.timeout, group=call.group)  # fmt: skip
    return flat.view(call.total, -1).index_select(0, back).t().bool()  # [B, T]


def _coupling(mech: Mechanism) -> str:
    """Why a mechanism's heads cannot be computed apart, as far as its class tells."""
    from ..mechanisms._seeded import SeededDraws

    if hasattr(mech, "head_log_decays"):
        return "a decay per head index"
    if isinstance(mech, SeededDraws):
        return "random draws from the module's seed"
    return f"{mech.name} does not declare heads_independent (per-head options, routing across heads or draws)"


@register_strategy
class Ulysses(Strategy):
    name = "ulysses"
    summary = "all-to-all sequence <-> heads; any mechanism with independent heads, heads divisible by W"

    def refuses(
        self, mech: Mechanism, pattern: Pattern, *, layout: str, world: int, total: int, heads: int, kv_heads: int
    ):
        if mech.trainable:
            return "trainable mechanisms are not split by head (their parameters would have to be)"
        if not mech.heads_independent:
            return f"heads are not independent: {_coupling(mech)}"
        if heads % world or kv_heads % world:
            return f"needs query and kv heads divisible by W={world}; got {heads} and {kv_heads}"
        return None

    def run(self, call: CPCall) -> torch.Tensor:
        attend = dict(pattern=call.pattern, scale=call.scale if call.mech.uses_scale else None)
        if call.world == 1:
            return call.mech(call.q, call.k, call.v, key_padding_mask=call.key_padding_mask, **attend)
        perm = order(call.total, call.world, call.layout).to(call.q.device)  # layout index -> global position
        back = torch.argsort(perm)  # global position -> layout index
        q, k, v = (_to_heads(t, call, back, name) for t, name in ((call.q, "q"), (call.k, "k"), (call.v, "v")))
        out = call.mech(q, k, v, key_padding_mask=_full_mask(call, back), **attend)  # [B, T, H/W, Dv]
        return _to_tokens(out, call, perm)
