"""Sigmoid attention in tiles with a recomputing backward: no T x T tensor, forward or backward.

    out_i = sum_j sigmoid(s_ij) v_j,    s_ij = q_i . k_j + bias_i       (q arrives pre-scaled)

Sigmoid weights need no row normaliser, so the output is a plain sum over key tiles. Each tile of
(heads, query block, key block) is small enough to stay in cache; the backward pass recomputes a
tile's weights from q and k (as FlashSigmoid does) instead of storing them:
    dV += P^T dO,   dS = (dO V^T) * P * (1 - P),   dQ += dS K,   dK += dS^T Q.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .amp import autocast_off

# Tile sizes. Measured on the 2-core CPU at T = 4096, H = 8, D = 64 (forward): one head of 512 x 512
# -> 390-410 ms (SDPA: 345 ms); all 8 heads of 128 x 4096 -> 480-500 ms (scores fall out of cache).
QUERY_TILE = 512
KEY_TILE = 512
TILE_ELEMENTS = 1 << 18  # heads per tile are chosen so a tile's scores stay near 1 MiB of fp32


def _tiles(n: int, tq: int, tk: int, causal_offset: int | None) -> Iterator[tuple[slice, slice, slice, bool]]:
    """(heads, queries, keys, crosses-diagonal) of every tile with at least one visible key."""
    bq, bk = min(QUERY_TILE, tq), min(KEY_TILE, tk)
    hs = max(1, TILE_ELEMENTS // (bq * bk))
    for h in range(0, n, hs):
        for s in range(0, tq, bq):
            e = min(s + bq, tq)
            end = tk if causal_offset is None else min(tk, e + causal_offset)  # keys after it: never seen
            for ks in range(0, end, bk):
                ke = min(ks + bk, end)
                diag = causal_offset is not None and ke - 1 > s + causal_offset
                yield slice(h, h + hs), slice(s, e), slice(ks, ke), diag


def _weights(
    q: torch.Tensor,
    k: torch.Tensor,
    bias: torch.Tensor,
    valid: torch.Tensor | None,
    rows: slice,
    cols: slice,
    diag: bool,
    causal_offset: int | None,
) -> torch.Tensor:
    """Sigmoid weights ``[h, rows, cols]`` of one tile; masked keys get weight exactly 0."""
    s = torch.bmm(q, k.transpose(1, 2))  # [h, rows, cols]
    s.add_(bias[:, :, None])
    if diag:  # keys after a query's own position
        qpos = torch.arange(rows.start, rows.stop, device=s.device)[:, None] + causal_offset
        kpos = torch.arange(cols.start, cols.stop, device=s.device)[None, :]
        s.masked_fill_(kpos > qpos, float("-inf"))
    if valid is not None:
        s.masked_fill_(~valid[:, None, :], float("-inf"))
    return s.sigmoid_()


class TiledSigmoidAttention(torch.autograd.Function):
    """``q [N,Tq,D]`` (pre-scaled), ``k [N,Tk,D]``, ``v [N,Tk,E]``, ``bias [N,Tq]``, ``valid [N,Tk] | None``."""

    @staticmethod
    @autocast_off
    def forward(ctx, q, k, v, bias, valid, causal_offset):
        out = torch.zeros(q.shape[0], q.shape[1], v.shape[2], dtype=q.dtype, device=q.device)
        for h, r, c, diag in _tiles(q.shape[0], q.shape[1], k.shape[1], causal_offset):
            vt = None if valid is None else valid[h, c]
            p = _weights(q[h, r], k[h, c], bias[h, r], vt, r, c, diag, causal_offset)
            out[h, r].baddbmm_(p, v[h, c])
        ctx.save_for_backward(q, k, v, bias, valid)
        ctx.causal_offset = causal_offset
        return out

    @staticmethod
    @autocast_off
    def backward(ctx, dout):
        q, k, v, bias, valid = ctx.saved_tensors
        off = ctx.causal_offset
        dout = dout.contiguous()
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for h, r, c, diag in _tiles(q.shape[0], q.shape[1], k.shape[1], off):
            vt = None if valid is None else valid[h, c]
            p = _weights(q[h, r], k[h, c], bias[h, r], vt, r, c, diag, off)  # recomputed
            do = dout[h, r]
            dv[h, c].baddbmm_(p.transpose(1, 2), do)
            ds = torch.bmm(do, v[h, c].transpose(1, 2)).mul_(p)  # dP * P
            ds.sub_(ds * p)  # dP * P * (1 - P)
            dq[h, r].baddbmm_(ds, k[h, c])
            dk[h, c].baddbmm_(ds.transpose(1, 2), q[h, r])
        return dq, dk, dv, None, None, None


def tiled_sigmoid_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor,
    *,
    valid: torch.Tensor | None = None,
    causal_offset: int | None = None,
) -> torch.Tensor:
    """Autograd-aware entry point; ``causal_offset=None`` means every key is visible to every query,
    otherwise query i sees keys ``j <= i + causal_offset``."""
    return TiledSigmoidAttention.apply(q, k, v, bias, valid, causal_offset)
