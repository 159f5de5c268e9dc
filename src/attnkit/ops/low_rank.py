"""Pieces of the low-rank mechanisms (Nyström landmarks, Agent tokens, Linformer projections).

Segments are defined over the *real* tokens of a row, in order: with ``n`` real tokens and ``m`` segments,
the real token of rank ``r`` (0-based, counting real tokens only) lies in segment ``floor(r * m / n)``. So
the segments are contiguous runs whose sizes differ by at most one (ragged when ``m`` does not divide
``n``), a row with padding is segmented as if its padding were removed, and with ``n < m`` every token is
its own segment and the other segments are empty (``valid`` False). Padded tokens lie in no segment.
"""

from __future__ import annotations

import torch


def real_ranks(mask: torch.Tensor | None, batch: int, t: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank of each token among the real ones ``[B|1, T]`` (long; a padded token gets the rank the next real
    one would get) and the number of real tokens per row ``[B|1, 1]``."""
    if mask is None:
        return torch.arange(t, device=device)[None], torch.full((1, 1), t, device=device)
    inclusive = mask.cumsum(dim=1)  # [B, T]
    return inclusive - mask.long(), inclusive[:, -1:]


def segment_ids(mask: torch.Tensor | None, batch: int, t: int, segments: int, device) -> torch.Tensor:
    """Segment of each token ``[B|1, T]`` (long); padded tokens get ``segments`` (one past the last)."""
    rank, count = real_ranks(mask, batch, t, device)
    seg = torch.div(rank * segments, count.clamp(min=1), rounding_mode="floor")
    return seg if mask is None else torch.where(mask, seg, segments)


def segment_means(x: torch.Tensor, mask: torch.Tensor | None, segments: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of ``x [B, T, H, D]`` over each segment of its real tokens -> ``[B, segments, H, D]``, and which
    segments hold a token ``[B|1, segments]`` (empty ones are 0). Linear in T, no ``[T, segments]`` tensor."""
    b, t, h, d = x.shape
    if mask is None and t % segments == 0:  # equal segments: one reshape
        means = x.view(b, segments, t // segments, h, d).mean(dim=2)
        return means, torch.ones(1, segments, dtype=torch.bool, device=x.device)
    seg = segment_ids(mask, b, t, segments, x.device).expand(b, t)  # [B, T]
    sums = x.new_zeros(b, segments + 1, h * d)
    sums.scatter_add_(1, seg[:, :, None].expand(b, t, h * d), x.reshape(b, t, h * d))  # [B, m + 1, H*D]
    counts = torch.zeros(b, segments + 1, device=x.device, dtype=x.dtype)
    counts.scatter_add_(1, seg, torch.ones_like(seg, dtype=x.dtype))  # [B, m + 1]
    counts = counts[:, :segments]
    means = sums[:, :segments].view(b, segments, h, d) / counts.clamp(min=1)[:, :, None, None]
    return means, counts > 0


def segment_matrix(mask: torch.Tensor | None, batch: int, t: int, segments: int, device, dtype) -> torch.Tensor:
    """The averaging matrix ``P [B|1, segments, T]`` (row s: 1/|s| on the tokens of segment s), written out
    for references: ``P @ x`` is the segment means."""
    seg = segment_ids(mask, batch, t, segments, device)  # [B|1, T]
    one_hot = (seg[:, None, :] == torch.arange(segments, device=device)[None, :, None]).to(dtype)  # [B|1, m, T]
    return one_hot / one_hot.sum(-1, keepdim=True).clamp(min=1)


def iterative_pinv(a: torch.Tensor, iterations: int) -> torch.Tensor:
    """Nyströmformer's iterative Moore-Penrose pseudo-inverse of ``a [..., m, m]`` (Razavi et al. 2014):

        Z_0 = a^T / (max_j sum_i |a_ij| * max_i sum_j |a_ij|)
        Z_{k+1} = Z_k (13 I - a Z_k (15 I - a Z_k (7 I - a Z_k))) / 4

    The normaliser is per matrix (per batch row and head), so rows never influence each other. Rows and
    columns that are all zero stay zero in Z: the result is the iteration on the non-zero block.
    """
    norm = a.abs().sum(-2).amax(-1) * a.abs().sum(-1).amax(-1)  # [...]
    z = a.transpose(-1, -2) / norm.clamp(min=torch.finfo(a.dtype).tiny)[..., None, None]
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    for _ in range(iterations):
        az = a @ z
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


def compact_order(mask: torch.Tensor) -> torch.Tensor:
    """Per row, the positions of the real tokens first (in order), then the padded ones: ``[B, T]`` long.
    Gathering by it moves a row's real tokens to the front, so position-dependent weights index real ranks."""
    return torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices


def gather_tokens(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """``x [B, T, H, D]`` with its tokens in ``order [B, T]``."""
    b, t, h, d = x.shape
    return torch.gather(x, 1, order[:, :, None, None].expand(b, t, h, d))


def never_empty(mask: torch.Tensor) -> torch.Tensor:
    """``mask [..., N]`` with rows that hold no True made all True. SDPA over no key gives NaN (and NaN gradients
    even where that output is then replaced), so such rows attend to their (zero) entries and are zeroed after."""
    return mask | ~mask.any(-1, keepdim=True)
