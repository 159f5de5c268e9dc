"""Kernels of Gaussian adaptive attention (``mechanisms/gaussian.py``): causal score moments in closed
form, and softmax attention with Gaussian logits in tiles with a recomputing backward.

Score moments: with s_ij = scale q_i . k_j over the keys j a query sees,
    sum_j s_ij = scale q_i . (sum_j k_j),     sum_j s_ij^2 = scale^2 q_i^T (sum_j k_j k_j^T) q_i,
so a row's mean and variance need no T x T tensor: prefix sums of k and k k^T over blocks of keys
aligned with blocks of queries, plus the scores inside each diagonal block (O(T·D^2 + T·block·D)).

Quadratic-logit attention: ``out_i = sum_j p_ij v_j`` with ``p_ij = 2^(l_ij) / sum_j' 2^(l_ij')``,
``l_ij = t_ij (c_i - t_ij)`` and ``t_ij = q_i . k_j + u_i`` (q arrives pre-scaled; base 2 because exp2 is
twice as fast as exp on CPU). Tiles hold a block of query rows against every key those rows see, so a
row's maximum and normaliser are complete in its tile, and the output rows are divided by the sums
after the value product. The backward recomputes each tile:
    dl = ln2 P (dP - rowsum(P dP)),  dt = dl (c - 2t),  dc = rowsum(dl t),  du = rowsum(dt),
    dq = dt K,  dk = dt^T q,  dv = P^T dO.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from .amp import autocast_off

# Tile sizes, measured at T = 4096, H = 8, D = 64 on the 2-core CPU against 512K/128 and 2M/256 elements/rows:
# a tile's logits near 4 MiB of fp32 and causal tiles of at most 256 rows were fastest with 1 and 2 threads.
TILE_ELEMENTS = 1 << 20
MIN_ROWS = 16  # at least this many query rows per tile, however many keys they see
MAX_CAUSAL_ROWS = 256  # causal: rows per tile at most (the upper half of a tile's diagonal block is waste)
MOMENT_BLOCK = 128  # keys per block of the causal prefix sums (64 and 256 measured slower at T = 4096)
LN2 = math.log(2.0)


def causal_moments(q: torch.Tensor, k: torch.Tensor, q_offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``sum_j q_i.k_j`` and ``sum_j (q_i.k_j)^2`` over keys ``j <= i + q_offset``: two ``[N, Tq]``.

    ``q [N, Tq, D]``, ``k [N, Tk, D]`` (heads first) with ``Tk = q_offset + Tq`` (padded keys already zeroed).
    """
    n, tq, d = q.shape
    c = MOMENT_BLOCK
    nb = -(-tq // c)
    qb = torch.nn.functional.pad(q, (0, 0, 0, nb * c - tq)).view(n, nb, c, d)
    before = k[:, :q_offset]
    rest = torch.nn.functional.pad(k[:, q_offset:], (0, 0, 0, nb * c - tq)).view(n, nb, c, d)  # beside query blocks
    blk1, blk2 = rest.sum(2), rest.mT @ rest  # per key block: [N, nb, D], [N, nb, D, D]
    s1 = [before.sum(1)]  # sums over the keys before each query block
    early1 = early2 = 0.0
    if tq < d:  # few queries after a long cache (decoding): their scores cost O(Tq·T·D), the D x D sum O(T·D^2)
        s2 = [torch.zeros(n, d, d, dtype=k.dtype, device=k.device)]
        early = q @ before.mT  # [N, Tq, q_offset]
        early1, early2 = early.sum(-1), early.square().sum(-1)
        s1 = [torch.zeros_like(s1[0])]
    else:
        s2 = [before.mT @ before]
    for b in range(nb - 1):  # a loop of small adds: torch.cumsum over a middle dim is ~10x slower here
        s1.append(s1[-1] + blk1[:, b])
        s2.append(s2[-1] + blk2[:, b])
    s1, s2 = torch.stack(s1, dim=1), torch.stack(s2, dim=1)
    inter1 = (qb @ s1[..., None])[..., 0]  # [N, nb, c]
    inter2 = ((qb @ s2) * qb).sum(-1)
    intra = (qb @ rest.mT).tril_()  # [N, nb, c, c]: scores inside the diagonal block, later keys zeroed
    m1 = (inter1 + intra.sum(-1)).view(n, nb * c)[:, :tq] + early1
    m2 = (inter2 + intra.square_().sum(-1)).view(n, nb * c)[:, :tq] + early2
    return m1, m2


def _tiles(n: int, tq: int, tk: int, causal_offset: int | None) -> Iterator[tuple[slice, slice, int]]:
    """(heads, query rows, keys those rows see) of every tile."""
    s = 0
    while s < tq:
        if causal_offset is None:
            rows = TILE_ELEMENTS // tk
        else:  # rows * (s + offset + rows) keys <= TILE_ELEMENTS: early blocks see few keys and take more rows
            before = s + causal_offset
            rows = min(MAX_CAUSAL_ROWS, int((math.sqrt(before * before + 4 * TILE_ELEMENTS) - before) / 2))
        e = min(tq, s + max(MIN_ROWS, rows))
        end = tk if causal_offset is None else min(tk, e + causal_offset)
        hs = max(1, TILE_ELEMENTS // ((e - s) * end))
        for h in range(0, n, hs):
            yield slice(h, h + hs), slice(s, e), end
        s = e


class _Scratch:
    """Tile buffers reused across the tiles of one call (fresh multi-MiB tensors per tile cost page faults),
    and the strictly upper triangle that hides later keys in a diagonal block."""

    def __init__(self, like: torch.Tensor):
        self.like, self.flat, self.upper = like, {}, None

    def take(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        n = math.prod(shape)
        buf = self.flat.get(name)
        if buf is None or buf.numel() < n:
            buf = self.flat[name] = torch.empty(n, dtype=self.like.dtype, device=self.like.device)
        return buf[:n].view(shape)

    def ahead(self, n: int) -> torch.Tensor:
        if self.upper is None or self.upper.shape[0] < n:
            self.upper = torch.ones(n, n, dtype=torch.bool, device=self.like.device).triu_(1)
        return self.upper[:n, :n]


def _weights(q, k, u, c, valid, heads: slice, rows: slice, end: int, causal_offset: int | None, scratch: _Scratch):
    """(W, sums, t) of one tile ``[h, rows, end]``: W = 2^(l - rowmax l), sums its row sums (0 for a row
    that sees no key, whose W is all 0). W and t live in ``scratch`` until the next tile."""
    shape = (len(range(q.shape[0])[heads]), rows.stop - rows.start, end)
    t = torch.baddbmm(
        u[heads, rows, None], q[heads, rows], k[heads, :end].transpose(1, 2), out=scratch.take("t", shape)
    )
    logits = torch.sub(c[heads, rows, None], t, out=scratch.take("w", shape)).mul_(t)
    if causal_offset is not None:  # keys after a query's own position: the last rows-wide block of columns
        first = rows.start + causal_offset
        logits[:, :, first:end].masked_fill_(scratch.ahead(end - first), float("-inf"))
    if valid is not None:
        logits.masked_fill_(~valid[heads, None, :end], float("-inf"))
    top = logits.amax(-1, keepdim=True)
    top.masked_fill_(top == float("-inf"), 0.0)  # a row that sees no key: its weights stay 0, not NaN
    w = logits.sub_(top).exp2_()
    return w, w.sum(-1, keepdim=True), t


class QuadraticLogitAttention(torch.autograd.Function):
    """``q [N,Tq,D]`` (pre-scaled), ``k [N,Tk,D]``, ``v [N,Tk,E]``, ``u, c [N,Tq]``, ``valid [N,Tk] | None``."""

    @staticmethod
    @autocast_off
    def forward(ctx, q, k, v, u, c, valid, causal_offset):
        out = torch.zeros(q.shape[0], q.shape[1], v.shape[2], dtype=q.dtype, device=q.device)
        tiny, scratch = torch.finfo(q.dtype).tiny, _Scratch(q)
        for h, r, end in _tiles(q.shape[0], q.shape[1], k.shape[1], causal_offset):
            w, sums, _ = _weights(q, k, u, c, valid, h, r, end, causal_offset, scratch)
            dest = out[h, r]
            if dest.is_contiguous():  # one head per tile: write in place
                torch.bmm(w, v[h, :end], out=dest)
            else:
                dest.copy_(torch.bmm(w, v[h, :end]))
            dest.div_(sums.clamp(min=tiny))  # a row seeing no key: 0 / tiny
        ctx.save_for_backward(q, k, v, u, c, valid)
        ctx.causal_offset = causal_offset
        return out

    @staticmethod
    @autocast_off
    def backward(ctx, dout):
        q, k, v, u, c, valid = ctx.saved_tensors
        off = ctx.causal_offset
        dout = dout.contiguous()
        tiny, scratch = torch.finfo(q.dtype).tiny, _Scratch(q)
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        du, dc = torch.zeros_like(u), torch.zeros_like(c)
        for h, r, end in _tiles(q.shape[0], q.shape[1], k.shape[1], off):
            w, sums, t = _weights(q, k, u, c, valid, h, r, end, off, scratch)  # recomputed
            p = w.div_(sums.clamp(min=tiny))
            do = dout[h, r]
            dv[h, :end].baddbmm_(p.transpose(1, 2), do)
            # dl / ln2 = P dP - P rowsum(P dP); the row sum taken here, not as dO . O, is exactly 0 for a row
            # with one visible key, whose logit derivatives (var ~ eps) would blow rounding up otherwise
            dl = torch.bmm(do, v[h, :end].transpose(1, 2)).mul_(p)
            dl.addcmul_(p, dl.sum(-1, keepdim=True), value=-1.0).mul_(LN2)
            dc[h, r] = (dl * t).sum(-1)
            dt = torch.sub(c[h, r, None], t, alpha=2.0).mul_(dl)  # dl (c - 2t)
            du[h, r] = dt.sum(-1)
            dq[h, r] = torch.bmm(dt, k[h, :end])
            dk[h, :end].baddbmm_(dt.transpose(1, 2), q[h, r])
        return dq, dk, dv, du, dc, None, None


def quadratic_logit_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    u: torch.Tensor,
    c: torch.Tensor,
    *,
    valid: torch.Tensor | None = None,
    causal_offset: int | None = None,
) -> torch.Tensor:
    """Autograd-aware entry point; ``causal_offset=None``: every key is visible to every query,
    otherwise query i sees keys ``j <= i + causal_offset``."""
    return QuadraticLogitAttention.apply(q, k, v, u, c, valid, causal_offset)
