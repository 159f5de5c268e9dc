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
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    bs: int,
    scale: float,
    q_offset: int = 0,
) -> torch.Tensor:
    """``q [B, T, Hq, Dk]``, ``k [B, T, Hkv, Dk]``, ``v [B, T, Hkv, Dv]`` (every token so far) -> the outputs
    ``[B, T - q_offset, Hq, Dv]`` of the queries from position ``q_offset`` on (a chunk after a cache): only
    the blocks that hold them attend. Outputs at padded positions are finite but meaningless (the caller
    zeroes them).
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
    # the first compact row this call needs: the fewest real tokens any row has before q_offset
    first_row = q_offset if n_real is None else int(key_padding_mask[:, :q_offset].sum(1).min()) if q_offset else 0
    blocks = -(-t // bs)
    q, k, v = (F.pad(x, (0, 0, 0, 0, 0, blocks * bs - t)) for x in (q, k, v))  # [B, nb * bs, H, D]
    agents = q.view(b, blocks, bs, h, dk).mean(2)  # [B, nb, H, Dk]; a partial block's agent is never seen
    agent_values = _gather(agents, k, v, n_real, bs, scale)  # [B, nb, H, Dv]
    first = first_row // bs
    out = _broadcast_and_local(q, k, v, agents, agent_values, n_real, bs, scale, first)  # [B, Tp - first*bs, H, Dv]
    out = F.pad(out, (0, 0, 0, 0, first * bs, 0))[:, :t]  # [B, T, H, Dv]; rows of earlier blocks: not asked for
    if order is not None:
        index = order[:, :, None, None].expand(-1, -1, h, out.shape[-1])
        out = torch.zeros_like(out).scatter(1, index, out)  # row r of the compact order back to its position
    return out[:, q_offset:]


def _gather(agents, k, v, n_real, bs: int, scale: float) -> torch.Tensor:
    """Agent c attends to the (real) keys of blocks <= c: one SDPA call over all keys with a prefix mask."""
    blocks, tp = agents.shape[1], k.shape[1]
    j = torch.arange(tp, device=k.device)
    ends = (torch.arange(blocks, device=k.device) + 1) * bs
    sees = j[None, :] < ends[:, None]  # [nb, Tp]
    if n_real is not None:
        sees = never_empty(sees[None] & (j[None, None, :] < n_real[:, :, None]))  # [B, nb, Tp]; no key: the 1st
    return _sdpa(agents, k, v, sees[..., None, :, :] if sees.dim() == 3 else sees, scale)


def _broadcast_and_local(q, k, v, agents, agent_values, n_real, bs: int, scale: float, first: int) -> torch.Tensor:
    """Each block of queries (from block ``first`` on) attends, in one softmax, to the agents of earlier blocks and
    to its own keys up to the query: batched over blocks, keys = [nb agents, bs keys of the block]."""
    b, h, dk = q.shape[0], q.shape[2], q.shape[3]
    nb, dv = agents.shape[1], v.shape[-1]
    q, k, v = (x[:, first * bs :] for x in (q, k, v))  # [B, (nb - first) * bs, H, D]
    blocks = nb - first
    keys = torch.cat([agents[:, None].expand(b, blocks, nb, h, dk), k.reshape(b, blocks, bs, h, dk)], dim=2)
    values = torch.cat([agent_values[:, None].expand(b, blocks, nb, h, dv), v.reshape(b, blocks, bs, h, dv)], dim=2)
    c = torch.arange(first, nb, device=q.device)  # the query blocks
    i = torch.arange(bs, device=q.device)
    sees_agent = (torch.arange(nb, device=q.device)[None, :] < c[:, None])[:, None, :].expand(blocks, bs, nb)
    local = (i[None, :] <= i[:, None]).expand(blocks, bs, bs)  # [nb', bs, bs]: j <= i in the block
    if n_real is not None:  # keys beyond the real ones are not seen (a padded query sees itself: finite)
        real_key = (c[:, None] * bs + i[None, :])[None, :, None, :] < n_real[:, :, None, None]  # [B, nb, 1, bs]
        local = local[None] & (real_key | torch.eye(bs, dtype=torch.bool, device=q.device))
        sees_agent = sees_agent[None].expand(b, -1, -1, -1)
    mask = torch.cat([sees_agent, local], dim=-1)[..., None, :, :]  # [B|., nb, 1, bs, nb + bs]
    out = _sdpa(q.reshape(b, blocks, bs, h, dk), keys, values, mask, scale)  # [B, nb', bs, H, Dv]
    return out.reshape(b, blocks * bs, h, dv)


def _sdpa(q, k, v, mask, scale: float) -> torch.Tensor:
    """SDPA on ``[..., T, H, D]`` tensors (any leading dims), heads moved next to the tokens and back."""
    out = F.scaled_dot_product_attention(q.transpose(-3, -2), k.transpose(-3, -2), v.transpose(-3, -2),
                                         attn_mask=mask, scale=scale)  # fmt: skip
    return out.transpose(-3, -2)
