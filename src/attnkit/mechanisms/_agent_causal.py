"""Agent attention in causal_self, blocked (the fast path of ``agent.py``; its reference states the math).

The real tokens are moved to the front of each row first (``ops/low_rank.compact_order``): blocks of real
tokens are then contiguous, so block c is rows [c * bs, (c + 1) * bs) and a reshape gives every block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops.gqa import repeat_kv
from ..ops.low_rank import compact_order, gather_tokens, never_empty


def blocked_causal_agents(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None, bs: int, scale: float
) -> torch.Tensor:
    """``q [B, T, Hq, Dk]``, ``k [B, T, Hkv, Dk]``, ``v [B, T, Hkv, Dv]`` (every token so far) -> ``[B, T, Hq, Dv]``.

    Outputs at padded positions are finite but meaningless (the caller zeroes them).
    """
    b, t, h, dk = q.shape
    groups = h // k.shape[2]
    k, v = repeat_kv(k, groups), repeat_kv(v, groups)  # [B, T, H, D]
    order = None
    n_real = None  # [B, 1] real tokens per row, None: all
    if key_padding_mask is not None:
        order = compact_order(key_padding_mask)
        q, k, v = (gather_tokens(x, order) for x in (q, k, v))
        n_real = key_padding_mask.sum(1, keepdim=True)
    blocks = -(-t // bs)
    q, k, v = (F.pad(x, (0, 0, 0, 0, 0, blocks * bs - t)) for x in (q, k, v))  # [B, nb * bs, H, D]
    agents = q.view(b, blocks, bs, h, dk).mean(2)  # [B, nb, H, Dk]; a partial block's agent is never seen
    agent_values = _gather(agents, k, v, n_real, bs, scale)  # [B, nb, H, Dv]
    out = _broadcast_and_local(q, k, v, agents, agent_values, n_real, bs, scale)[:, :t]  # [B, T, H, Dv]
    if order is None:
        return out
    index = order[:, :, None, None].expand(-1, -1, h, out.shape[-1])
    return torch.zeros_like(out).scatter(1, index, out)  # row r of the compact order back to its position


def _gather(agents, k, v, n_real, bs: int, scale: float) -> torch.Tensor:
    """Agent c attends to the (real) keys of blocks <= c: one SDPA call over all keys with a prefix mask."""
    blocks, tp = agents.shape[1], k.shape[1]
    j = torch.arange(tp, device=k.device)
    ends = (torch.arange(blocks, device=k.device) + 1) * bs
    sees = j[None, :] < ends[:, None]  # [nb, Tp]
    if n_real is not None:
        sees = never_empty(sees[None] & (j[None, None, :] < n_real[:, :, None]))  # [B, nb, Tp]; no key: the 1st
    return _sdpa(agents, k, v, sees[..., None, :, :] if sees.dim() == 3 else sees, scale)


def _broadcast_and_local(q, k, v, agents, agent_values, n_real, bs: int, scale: float) -> torch.Tensor:
    """Each block of queries attends, in one softmax, to the agents of earlier blocks and to its own keys up to
    the query: batched over blocks, keys = [nb agents, bs keys of the block]."""
    b, tp, h, dk = q.shape
    blocks, dv = agents.shape[1], v.shape[-1]
    keys = torch.cat([agents[:, None].expand(b, blocks, blocks, h, dk), k.view(b, blocks, bs, h, dk)], dim=2)
    values = torch.cat([agent_values[:, None].expand(b, blocks, blocks, h, dv), v.view(b, blocks, bs, h, dv)], dim=2)
    c = torch.arange(blocks, device=q.device)
    i = torch.arange(bs, device=q.device)
    sees_agent = (c[None, :] < c[:, None])[:, None, :].expand(blocks, bs, blocks)  # [nb, bs, nb]: c' < c
    local = (i[None, :] <= i[:, None]).expand(blocks, bs, bs)  # [nb, bs, bs]: j <= i in the block
    if n_real is not None:  # keys beyond the real ones are not seen (a padded query sees itself: finite)
        real_key = (c[:, None] * bs + i[None, :])[None, :, None, :] < n_real[:, :, None, None]  # [B, nb, 1, bs]
        local = local[None] & (real_key | torch.eye(bs, dtype=torch.bool, device=q.device))
        sees_agent = sees_agent[None].expand(b, -1, -1, -1)
    mask = torch.cat([sees_agent, local], dim=-1)[..., None, :, :]  # [B|., nb, 1, bs, nb + bs]
    out = _sdpa(q.view(b, blocks, bs, h, dk), keys, values, mask, scale)  # [B, nb, bs, H, Dv]
    return out.reshape(b, tp, h, dv)


def _sdpa(q, k, v, mask, scale: float) -> torch.Tensor:
    """SDPA on ``[..., T, H, D]`` tensors (any leading dims), heads moved next to the tokens and back."""
    out = F.scaled_dot_product_attention(q.transpose(-3, -2), k.transpose(-3, -2), v.transpose(-3, -2),
                                         attn_mask=mask, scale=scale)  # fmt: skip
    return out.transpose(-3, -2)
