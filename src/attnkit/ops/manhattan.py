"""Decayed linear attention under a Manhattan-distance decay on a grid (RMT's spatial decay), without a T x T tensor.

    out_n = q_n . S(p_n),      S(p) = sum_m g^(|p - p_m|_1) k_m v_m^T

for tokens flattened row-major on a grid of any rank, with position p_m of token m. The decay
``g^(|dy| + |dx|) = g^|dy| · g^|dx|`` is a product over the axes, so the field S is the per-token outer
products ``k_m v_m^T`` filtered along each axis in turn by the 1-D two-sided filter ``y_i = sum_j g^|i-j| x_j``.
That filter is a forward scan ``f_i = g f_(i-1) + x_i`` (the keys j <= i) plus an exclusive backward scan
``b_i = g (b_(i+1) + x_(i+1))`` (the keys j > i): every weight is built as a product of decays <= 1, never as
``g^-n``, so nothing overflows or cancels for g near 0 or near 1, and the diagonal is counted once without
subtracting it. Time O(T·Dk·Dv) per axis, memory O(T·Dk·Dv) per head (the field).

An axis of at most ``MATMUL_AXIS`` cells is filtered instead by one batched matmul with its ``n x n`` matrix
``g^|i-j|`` (built as ``exp(|i-j| log g)``: it underflows to 0, never overflows): n multiply-adds per element
instead of the scan's few, but one BLAS call instead of n small steps, several times faster on image-sized axes.
"""

from __future__ import annotations

import math

import torch

MATMUL_AXIS = 256  # longest axis filtered by a dense n x n matmul; longer ones are scanned


def two_sided_matmul(x: torch.Tensor, log_decay: torch.Tensor, dim: int) -> torch.Tensor:
    """``y_i = sum_j g^|i-j| x_j`` along ``dim`` (>= 2) of a contiguous ``x [B, H, ...]``, ``log_decay [H]``, by
    one batched matmul on a view (no copy of x): ``[H, n, n] @ [B, H, before, n, after]``."""
    n = x.shape[dim]
    pos = torch.arange(n, device=x.device, dtype=x.dtype)
    gamma = torch.exp((pos[:, None] - pos[None, :]).abs() * log_decay.to(x.dtype).view(-1, 1, 1))  # [H, n, n]
    b, h = x.shape[:2]
    before, after = math.prod(x.shape[2:dim]), math.prod(x.shape[dim + 1 :])
    return (gamma.view(1, h, 1, n, n) @ x.reshape(b, h, before, n, after)).view(x.shape)


def two_sided_filter(x: torch.Tensor, decay: torch.Tensor, dim: int) -> torch.Tensor:
    """``y_i = sum_j g^|i-j| x_j`` along ``dim`` of ``x``; ``decay`` (g) broadcasts against one slice of ``x``
    taken along ``dim``."""
    xs = x.unbind(dim)
    n = len(xs)
    before = [xs[0]]  # before[i] = sum_{j <= i} g^(i-j) x_j
    after = [torch.zeros_like(xs[-1])]  # after[r] = sum_{j > i} g^(j-i) x_j for i = n-1-r
    for r in range(1, n):
        before.append(decay * before[-1] + xs[r])
        after.append(decay * (after[-1] + xs[n - r]))
    return torch.stack([f + b for f, b in zip(before, reversed(after), strict=True)], dim)


def manhattan_decayed_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, ...], log_decay: torch.Tensor
) -> torch.Tensor:
    """``q, k [B, T, H, F]``, ``v [B, T, H, Dv]`` (one kv head per query head), ``grid`` with ``prod == T``
    (row-major), ``log_decay [H]`` (log g <= 0). Returns ``out [B, T, H, Dv]`` with
    ``out_n = sum_m g^(|p_n - p_m|_1) (q_n . k_m) v_m``, in q's dtype (callers upcast)."""
    b, t, h, f = q.shape
    dv = v.shape[-1]
    field = torch.einsum("bthf,bthe->bhtfe", k, v).reshape(b, h, *grid, f, dv)  # [B, H, *grid, F, Dv]: k_m v_m^T
    # one slice along an axis is [B, H, *grid without that axis, F, Dv]: g broadcasts over all but H
    decay = torch.exp(log_decay.to(q.dtype)).view(1, h, *([1] * (len(grid) - 1)), 1, 1)
    for axis, size in enumerate(grid):
        if 1 < size <= MATMUL_AXIS:
            field = two_sided_matmul(field, log_decay, dim=2 + axis)
        elif size > MATMUL_AXIS:
            field = two_sided_filter(field, decay, dim=2 + axis)
    return torch.einsum("bthf,bhtfe->bthe", q, field.reshape(b, h, t, f, dv))
