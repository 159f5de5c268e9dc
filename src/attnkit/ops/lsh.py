"""Angular locality-sensitive hashing (Andoni et al. 2015, as used by Reformer): random rotations drawn
once from a seed, ``bucket(x) = argmax([x R, -x R])``.

Two vectors that point in similar directions land in the same bucket with high probability; the hash
looks only at the vector itself (never at other tokens or the sequence length), so it is safe in causal
patterns and under chunked decoding.
"""

from __future__ import annotations

import torch


def random_rotations(generator: torch.Generator, dim: int, n_hashes: int, n_buckets: int) -> torch.Tensor:
    """``R [n_hashes, dim, n_buckets // 2]`` Gaussian, in fp64 on the CPU (one draw per round of hashing).

    Its shape depends only on the options and the head dim, never on the call."""
    if n_buckets % 2:
        raise ValueError(f"angular LSH needs an even number of buckets; got {n_buckets}")
    return torch.randn(n_hashes, dim, n_buckets // 2, generator=generator, dtype=torch.float64)


def angular_buckets(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Bucket ids ``[..., n_hashes]`` (int64 in ``[0, n_buckets)``) of vectors ``x [..., D]``.

    Computed without gradient (an argmax has none) in the rotations' dtype: callers hash upcast inputs so
    that every path sees the same ids."""
    with torch.no_grad():
        r, d, half = rotations.shape
        flat = x.reshape(-1, d).to(rotations.dtype) @ rotations.permute(1, 0, 2).reshape(d, r * half)  # [N, R*n/2]
        rotated = flat.view(*x.shape[:-1], r, half)  # [..., R, n_buckets / 2]
        # argmax over [xR, -xR] without building it: the largest entry, or the most negative one in the second
        # half (on a tie the first half wins, as argmax takes the first maximum)
        top, top_at = rotated.max(dim=-1)
        low, low_at = rotated.min(dim=-1)
        return torch.where(top >= -low, top_at, low_at + rotated.shape[-1])  # [..., R]


def query_key_buckets(q: torch.Tensor, k: torch.Tensor, rotations: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Buckets of ``q [B, Tq, Hq, D]`` and ``k [B, Tk, Hkv, D]`` in the layout of ``ops.bucketed``:
    ``[B, Hq, R, Tq]`` and ``[B, Hq, R, Tk]`` (a key's buckets repeated for each query head that reads it)."""
    q_ids = angular_buckets(q, rotations).permute(0, 2, 3, 1)  # [B, Tq, Hq, R] -> [B, Hq, R, Tq]
    k_ids = angular_buckets(k, rotations)  # [B, Tk, Hkv, R]
    k_ids = k_ids.repeat_interleave(q.shape[2] // k.shape[2], dim=2).permute(0, 2, 3, 1)  # [B, Hq, R, Tk]
    return q_ids, k_ids
