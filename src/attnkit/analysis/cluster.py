"""Heads compared by what they attend to (Clark et al. 2019): Jensen–Shannon distances between heads' rows on
the same inputs, a classical-MDS 2-D embedding of those distances, and an average-linkage clustering.

No dependency beyond torch: MDS is one symmetric eigendecomposition; the clustering merges the two closest
clusters (mean pairwise distance) until ``k`` remain, which for the ``L*H <= a few hundred`` heads of one
capture is instant.
"""

from __future__ import annotations

import torch

from ..errors import InvalidOption

MAX_ROWS = 512  # query rows compared per head pair; more are subsampled evenly (the distances are means)


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
    bits, so in [0, 1]: 0 for identical rows, 1 for rows with disjoint support) between heads ``a`` and ``b``."""
    k = rows.shape[0]
    out = torch.zeros(k, k)
    ln2 = torch.log(torch.tensor(2.0))
    for a in range(k):
        m = 0.5 * (rows[a : a + 1] + rows[a:])  # [K - a, N, T]
        kl_a = (torch.special.xlogy(rows[a : a + 1], rows[a : a + 1]) - torch.special.xlogy(rows[a : a + 1], m)).sum(-1)
        kl_b = (torch.special.xlogy(rows[a:], rows[a:]) - torch.special.xlogy(rows[a:], m)).sum(-1)
        jsd = (0.5 * (kl_a + kl_b) / ln2).clamp(0.0, 1.0)  # [K - a, N] bits
        dist = jsd.sqrt().mean(-1)
        out[a, a:] = dist
        out[a:, a] = dist
    out.fill_diagonal_(0.0)
    return out


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


def average_linkage(d: torch.Tensor, clusters: int) -> torch.Tensor:
    """``[K]`` int labels: agglomerative clustering of ``d [K, K]`` with average linkage down to ``clusters``
    clusters, labelled 0, 1, ... in order of their first head."""
    k = d.shape[0]
    if isinstance(clusters, bool) or not isinstance(clusters, int) or clusters < 1:
        raise InvalidOption(f"clusters={clusters!r} is not valid; expected a positive integer")
    members = [[i] for i in range(k)]
    link = d.double().clone()
    link.fill_diagonal_(float("inf"))
    while len(members) > min(clusters, k):
        flat = int(link.argmin())
        a, b = divmod(flat, link.shape[0])
        a, b = min(a, b), max(a, b)
        na, nb = len(members[a]), len(members[b])
        merged = (link[a] * na + link[b] * nb) / (na + nb)  # average linkage: size-weighted mean
        link[a], link[:, a] = merged, merged
        link[a, a] = float("inf")
        keep = [i for i in range(link.shape[0]) if i != b]
        link = link[keep][:, keep]
        members[a] = members[a] + members[b]
        del members[b]
    labels = torch.empty(k, dtype=torch.long)
    for c, group in enumerate(sorted(members, key=min)):
        labels[group] = c
    return labels
