"""Feature maps phi of kernelized (linear) attention: softmax(q.k) is replaced by phi(q).phi(k)."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

FEATURE_MAPS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "elu1": lambda x: F.elu(x) + 1.0,  # Katharopoulos et al. 2020: positive, smooth
    "relu": F.relu,
    "identity": lambda x: x,  # no guarantee of positive scores: the normaliser may vanish
}


@functools.lru_cache(maxsize=64)  # mechanisms built with the same seed share one draw (read-only)
def orthogonal_gaussian(num_features: int, dim: int, seed: int) -> torch.Tensor:
    """``W [m, d]`` in fp64 on the CPU: per ``d x d`` block the orthonormal rows of Q from the QR of a
    Gaussian matrix, the last block cut to ``m mod d`` rows, each row scaled to a chi_d-distributed norm.

    Q's columns are multiplied by the signs of R's diagonal (Mezzadri 2007): LAPACK's Householder QR
    otherwise makes the first coordinate of Q's first column always negative, and the rows of W would
    not be Gaussian-distributed (the estimator would be biased)."""
    g = torch.Generator().manual_seed(seed)
    n_blocks = -(-num_features // dim)
    gauss = torch.randn(n_blocks, dim, dim, generator=g, dtype=torch.float64)  # [n, d, d]
    q, r = torch.linalg.qr(gauss)  # columns of each Q orthonormal
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[:, None, :]  # Haar: each column uniform on the sphere
    w = q.transpose(-1, -2).reshape(n_blocks * dim, dim)[:num_features]  # [m, d]: blocks of orthonormal rows
    norms = torch.randn(num_features, dim, generator=g, dtype=torch.float64).norm(dim=1)  # [m] ~ chi_d
    return w * norms[:, None]


def positive_random_features(x: torch.Tensor, w: torch.Tensor, *, per_row_max: bool) -> torch.Tensor:
    """FAVOR+'s positive random features over the last dim: ``phi(x) = exp(W x - |x|^2 / 2) / sqrt(m)``
    (``x [..., D]``, ``W [m, D]`` -> ``[..., m]``), so that ``phi(q).phi(k)`` estimates ``exp(q.k)``.

    ``per_row_max`` (for queries): subtract each row's largest exponent instead of ``|x|^2 / 2``. That is a
    factor per query, which cancels between numerator and normaliser, and keeps every exp() <= 1. Keys keep
    the exact exponent, bounded by ``|w|^2 / 2`` whatever the key.
    """
    logits = x @ w.T  # [..., m]
    if per_row_max:
        shift = logits.amax(-1, keepdim=True).detach()
    else:
        shift = 0.5 * x.square().sum(-1, keepdim=True)
    return logits.sub_(shift + 0.5 * math.log(w.shape[0])).exp_()
