"""Rotary position embedding (RoFormer, Su et al. 2021) on ``[B, T, H, D]`` tensors, rotate-half form."""

from __future__ import annotations

import torch


def rope_angles(positions: torch.Tensor, dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin ``[T, dim/2]`` (fp32) for integer positions ``[T]``."""
    if dim % 2:
        raise ValueError(f"rotary embedding needs an even head dim; got {dim}")
    inv_freq = base ** (-torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim)
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]  # [T, dim/2]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotate pairs ``(x[..., i], x[..., i + D/2])`` of ``x [B, T, H, D]`` by position-dependent angles."""
    cos, sin = rope_angles(positions, x.shape[-1], base)
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]  # [1, T, 1, D/2]
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return rotated.to(x.dtype)
