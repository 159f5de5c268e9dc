"""Heads compared by what they attend to (Clark et al. 2019): Jensen–Shannon distances between heads' rows on
the same inputs, a classical-MDS 2-D embedding of those distances, and a k-medoids clustering of them.

No dependency beyond torch: MDS is one symmetric eigendecomposition; k-medoids needs only the distances, and
for the ``L*H <= a few hundred`` heads of one capture it is instant.
"""

from __future__ import annotations

import math

import torch

from ..errors import InvalidOption

MAX_ROWS = 256  # query rows compared per head pair; more are subsampled evenly (the distances are means)


def head_rows(p: list[torch.Tensor], queries: torch.Tensor, max_rows: int = MAX_ROWS) -> torch.Tensor:
    """``[L*H, N, T]``: every head's attention rows (distributions) at the same ``N`` real queries.

    ``p[l]`` is ``[B, H, T, T]`` (rows summing to 1 or 0), ``queries [B, T]`` the rows to compare; more than
    ``max_rows`` of them are subsampled evenly."""
    rows = torch.stack([layer.permute(1, 0, 2, 3)[:, queries] for layer in p])  # [L, H, N, T]
    n = rows.shape[2]
    if n > max_rows:
        rows = rows[:, :, torch.linspace(0, n - 1, max_rows).round().long()]
    return rows.flatten(0, 1)


def js_distances(rows: torch.Tensor) -> torch.Tensor:
    """``[K, K]``: mean over the shared rows of the Jensen–Shannon distance (square root of the divergence in
    bits, so in [0, 1]: 0 for identical rows, 1 for rows with disjoint support) between heads ``a`` and ``b``.

    ``JSD(P, Q) = H((P + Q) / 2) - (H(P) + H(Q)) / 2``: one entropy per pair of rows, the rows' own computed once."""
    k = rows.shape[0]
    out = torch.zeros(k, k)
    own = _entropy(rows)  # [K, N] nats
    for a in range(k - 1):
        mixed = _entropy(0.5 * (rows[a : a + 1] + rows[a + 1 :]))  # [K - a - 1, N]
        jsd = ((mixed - 0.5 * (own[a : a + 1] + own[a + 1 :])) / math.log(2)).clamp(0.0, 1.0)  # bits
        dist = jsd.sqrt().mean(-1)
        out[a, a + 1 :] = dist
        out[a + 1 :, a] = dist
    return out


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -torch.special.xlogy(p, p).sum(-1)


def classical_mds(d: torch.Tensor, dims: int = 2) -> torch.Tensor:
    """``[K, dims]`` points whose Euclidean distances best match ``d [K, K]`` (Torgerson: double-centred squared
    distances, top eigenvectors scaled by the square roots of their eigenvalues; negative ones count as 0)."""
    k = d.shape[0]
    if k == 0:
        return torch.zeros(0, dims)
    d = d.double()
    centre = torch.eye(k, dtype=d.dtype) - 1.0 / k
    b = -0.5 * centre @ (d * d) @ centre
    values, vectors = torch.linalg.eigh(b)  # ascending
    values, vectors = values.flip(0)[:dims], vectors.flip(1)[:, :dims]
    points = vectors * values.clamp_min(0).sqrt()
    points = points * torch.where(points.sum(0) < 0, -1.0, 1.0)  # a fixed sign per axis: same input, same picture
    if points.shape[1] < dims:
        points = torch.cat([points, torch.zeros(k, dims - points.shape[1], dtype=points.dtype)], dim=1)
    return points.float()


def k_medoids(d: torch.Tensor, clusters: int, iterations: int = 100) -> torch.Tensor:
    """``[K]`` int labels: k-medoids on the distances ``d [K, K]`` (no coordinates needed), labelled 0, 1, ...
    in order of their first head (identical heads share one: there may be fewer clusters than asked).

    Deterministic: the first medoid is the most central head, each next one the head farthest from the medoids
    so far; then heads go to their nearest medoid and each medoid moves to the member closest to the rest,
    until nothing changes. (Average linkage, tried first, put 46 of MiniLM's 72 heads in one cluster and left
    singletons; medoids split the sink-parked middle layers from the broad first and last.)"""
    k = d.shape[0]
    if isinstance(clusters, bool) or not isinstance(clusters, int) or clusters < 1:
        raise InvalidOption(f"clusters={clusters!r} is not valid; expected a positive integer")
    if k == 0:
        return torch.zeros(0, dtype=torch.long)
    d = d.double()
    medoids = [int(d.sum(1).argmin())]
    while len(medoids) < min(clusters, k):
        gap = d[:, medoids].min(1).values  # each head's distance to its nearest medoid
        if gap.max() <= 0:  # the rest are copies of medoids: fewer clusters than asked
            break
        medoids.append(int(gap.argmax()))
    for _ in range(iterations):
        labels = d[:, medoids].argmin(1)
        moved = []
        for c, old in enumerate(medoids):
            members = (labels == c).nonzero().flatten()
            moved.append(int(members[d[members][:, members].sum(1).argmin()]) if len(members) else old)
        if moved == medoids:
            break
        medoids = moved
    labels = d[:, medoids].argmin(1)
    order = {int(c): i for i, c in enumerate(dict.fromkeys(labels.tolist()))}  # by first head
    return torch.tensor([order[int(c)] for c in labels], dtype=torch.long)
