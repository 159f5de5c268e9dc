"""Pooling of keys and values over fixed-size blocks of positions, counting only real (unpadded) tokens.

Block ``r`` holds positions ``r * block .. r * block + block - 1`` (the last block may be short). A block's
mean is over its real tokens; a block with no real token has mean 0 and count 0. Padded rows are excluded by
selection (``torch.where``), never by multiplying with 0, so a NaN in a padded slot cannot reach the mean.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def blocked(t: torch.Tensor, block: int, value: float | bool = 0.0) -> torch.Tensor:
    """``[B, T, ...] -> [B, ceil(T / block), block, ...]``, the tail padded with ``value``."""
    b, n = t.shape[:2]
    nb = -(-n // block)
    extra = nb * block - n
    if extra:
        pad = [0, 0] * (t.dim() - 2) + [0, extra]
        t = F.pad(t, pad, value=value)
    return t.view(b, nb, block, *t.shape[2:])


def real_mask(key_padding_mask: torch.Tensor | None, batch: int, length: int, device) -> torch.Tensor:
    """The key padding mask ``[B, T]`` (True = real), all True where none was given."""
    if key_padding_mask is not None:
        return key_padding_mask
    return torch.ones(batch, length, dtype=torch.bool, device=device)


def block_means(
    t: torch.Tensor, key_padding_mask: torch.Tensor | None, block: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over the real tokens of each block: ``t [B, T, H, D] -> means [B, nb, H, D], counts [B, nb]``.

    ``counts`` (in ``t``'s dtype) is the number of real tokens per block; blocks without one get mean 0.
    ``block >= T`` gives one block: the mean over all real tokens.
    """
    valid = real_mask(key_padding_mask, t.shape[0], t.shape[1], t.device)
    vb = blocked(valid, block, value=False)  # [B, nb, block]
    tb = blocked(t, block)  # [B, nb, block, H, D]
    kept = tb  # without padding no copy (the tail of the last block is zero-filled by ``blocked``)
    if key_padding_mask is not None:
        kept = torch.where(vb[..., None, None], tb, torch.zeros((), dtype=t.dtype, device=t.device))
    counts = vb.sum(dim=2).to(t.dtype)  # [B, nb]
    means = kept.sum(dim=2) / counts.clamp(min=1)[..., None, None]  # [B, nb, H, D]
    return means, counts
