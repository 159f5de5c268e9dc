"""Causal linear attention in chunks (the Lightning Attention-2 tiling), optionally with decay.

    S_t = g * S_{t-1} + k_t v_t^T,      out_t = q_t . S_t          (g = exp(log_decay) per state head)

for feature-mapped ``q, k``. The sequence is cut into chunks of C tokens: inside a chunk the masked
quadratic form ``(Q_c K_c^T * M) V_c`` with ``M_ij = g^(i-j)`` (intra), across chunks the running state
``g^(i+1) Q_c S_before`` (inter). Time O(T*C*(Dk+Dv) + T*Dk*Dv), memory O(T*(C + Dk*Dv/C)) per head:
linear in T, no cumulative sum over tokens, no T x T tensor. States before each chunk come from a
cumulative sum (no decay) or a recurrence over chunks (decay).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Tokens per chunk. Measured on the 2-core CPU (H 8, D 64, T 4K-16K): 64 and 128 are fastest;
# 32 spends its time on per-chunk states, 256 on the quadratic intra-chunk part.
DEFAULT_CHUNK = 64


def _states_before_chunks(kv: torch.Tensor, s0: torch.Tensor | None, chunk_decay: torch.Tensor | None) -> torch.Tensor:
    """``kv [B, H, n, Dk, Dv]`` chunk contributions -> the state before each chunk (same shape).

    Without decay an exclusive cumulative sum; with a per-head chunk decay ``a = g^C`` ``[H]`` the
    recurrence ``S_c = a S_{c-1} + kv_{c-1}`` step by step over the n = T/C chunks (on CPU 30x cheaper
    than a log-depth scan, which makes log2(n) full passes over all the states).
    """
    if chunk_decay is None:
        before = torch.cat([torch.zeros_like(kv[:, :, :1]), kv[:, :, :-1]], dim=2).cumsum(dim=2)
        return before if s0 is None else before + s0[:, :, None]
    a = chunk_decay.to(kv.dtype)[None, :, None, None]  # [1, H, 1, 1]
    before = torch.empty_like(kv)
    state = torch.zeros_like(kv[:, :, 0]) if s0 is None else s0.to(kv.dtype)
    for c in range(kv.shape[2]):
        before[:, :, c] = state
        state = a * state + kv[:, :, c]
    return before


def causal_linear_scan(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: torch.Tensor | None = None,
    *,
    chunk: int = DEFAULT_CHUNK,
    log_decay: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``q [B,T,Hq,Dk], k [B,T,Hkv,Dk], v [B,T,Hkv,Dv], state [B,Hkv,Dk,Dv] | None, log_decay [Hkv] | None``.

    Returns ``out [B,T,Hq,Dv]`` (a strided view) and the final state ``[B,Hkv,Dk,Dv]``. Query head h reads
    the state of kv head ``h // (Hq/Hkv)``. Computes in the dtype it is given (callers upcast).
    """
    b, t, hq, dk = q.shape
    hkv, dv = k.shape[2], v.shape[3]
    g = hq // hkv
    c = max(1, min(chunk, t))
    n = -(-t // c)  # number of chunks
    pad = n * c - t  # zero tokens at the end add nothing to any state

    def chunked(x: torch.Tensor, groups: int) -> torch.Tensor:
        # [B, T, H, D] -> [B, Hkv, groups, n, C, D]: heads first so every product below is a plain bmm
        x = F.pad(x.transpose(1, 2), (0, 0, 0, pad)) if pad else x.transpose(1, 2)
        return x.contiguous().view(b, hkv, groups, n, c, x.shape[-1])

    qc, kc, vc = chunked(q, g), chunked(k, 1), chunked(v, 1)
    pos = torch.arange(c, device=q.device, dtype=q.dtype)
    if log_decay is None:
        decay_in = None
        kv = kc.transpose(-1, -2) @ vc  # [B, Hkv, 1, n, Dk, Dv] each chunk's contribution to the state
        within = torch.ones(c, c, dtype=torch.bool, device=q.device).tril().to(q.dtype)  # [C, C]
    else:
        ld = log_decay.to(q.dtype)[:, None]  # [Hkv, 1]
        decay_in = torch.exp(ld * (pos + 1))[None, :, None, None, :, None]  # g^(i+1): [1, Hkv, 1, 1, C, 1]
        to_end = torch.exp(ld * (c - 1 - pos))[None, :, None, None, :, None]  # g^(C-1-j)
        kv = (kc * to_end).transpose(-1, -2) @ vc
        dist = pos[:, None] - pos[None, :]  # i - j
        within = torch.where(dist >= 0, torch.exp(ld[:, :, None] * dist.clamp(min=0)), 0.0)  # [Hkv, C, C]
        within = within[None, :, None, None]
    chunk_decay = None if log_decay is None else torch.exp(log_decay.to(q.dtype) * c)
    s0 = None if state is None else state.to(kv.dtype)
    before = _states_before_chunks(kv[:, :, 0], s0, chunk_decay)[:, :, None]  # [B, Hkv, 1, n, Dk, Dv]
    out = (qc if decay_in is None else qc * decay_in) @ before  # [B, Hkv, G, n, C, Dv] inter-chunk part
    scores = (qc @ kc.transpose(-1, -2)) * within  # [B, Hkv, G, n, C, C] intra-chunk part
    out.add_(scores @ vc)
    out = out.view(b, hq, n * c, dv)[:, :, :t].transpose(1, 2)  # [B, T, Hq, Dv]

    # the final state after the last real token (the last chunk may be padded)
    last = c - pad
    k_last, v_last, s_last = kc[:, :, 0, -1, :last], vc[:, :, 0, -1, :last], before[:, :, 0, -1]
    if log_decay is None:
        final = s_last + k_last.transpose(-1, -2) @ v_last
    else:
        ld = log_decay.to(q.dtype)[None, :, None, None]
        weights = torch.exp(ld * (last - 1 - pos[:last])[None, None, :, None])  # g^(L-1-j)
        final = torch.exp(ld * last) * s_last + (k_last * weights).transpose(-1, -2) @ v_last
    return out, final


def bidirectional_linear_scan(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, chunk: int = DEFAULT_CHUNK, log_decay: torch.Tensor
) -> torch.Tensor:
    """``out_i = sum_j g^|i-j| (q_i . k_j) v_j`` over the whole sequence: a forward and a backward causal
    scan, minus the diagonal that both count. Shapes as in :func:`causal_linear_scan`."""
    fwd, _ = causal_linear_scan(q, k, v, chunk=chunk, log_decay=log_decay)
    bwd, _ = causal_linear_scan(q.flip(1), k.flip(1), v.flip(1), chunk=chunk, log_decay=log_decay)
    g = q.shape[2] // k.shape[2]
    diag = (q * k.repeat_interleave(g, 2)).sum(-1, keepdim=True) * v.repeat_interleave(g, 2)  # [B, T, Hq, Dv]
    return fwd + bwd.flip(1) - diag
