"""``measure(maps)``: every head's metrics (research D §2), averaged over the real queries of every input.

Every metric reads a row of weights as a distribution ``p_i``: negative weights (the implicit matrices of
kernel mechanisms with signed features, of decay mechanisms without a normaliser) are clamped at 0 and the row
divided by its sum. For softmax heads that changes nothing; for the others ``row_sum`` (the raw rows' mean sum)
and ``negative_mass`` say how far the raw weights are from a distribution. No-op detection uses the raw
weights: it asks what the head adds, ``sum_j A_ij v_j``.

Per head (``HeadMetrics.table``, each ``[L, H]``):

- ``entropy``: ``-sum_j p_ij ln p_ij`` (nats); ``entropy_norm``: divided by ``ln n_i``, ``n_i`` the keys query
  i sees (real keys; ``j <= i`` when causal); queries that see one key are left out. Uniform rows give 1.
- ``distance``: ``sum_j p_ij d(i, j)``: ``|i - j|`` on a sequence; on an image model's grid the Euclidean
  distance between patch centres (in patches), over patch queries and keys only (the prefix, a class token, is
  left out and the rows renormalised over the patches). ``profile``: the mass at each distance bin (0, 1,
  2-3, 4-7, ...: powers of two), same rows.
- ``local_fraction``: mass within ``d <= local_window`` (same distance, same rows); ``self``: ``p_ii``.
- ``previous_token``, ``duplicate_token``, ``induction``: the ``mul`` role scores (``roles.py``).
- ``sink_first``: mass on the first token. Sinks (Gu et al. 2025, eps = ``sink_threshold``): key j's mean
  received mass ``alpha_j`` over the real queries that see it; keys seen by fewer than half of the real queries
  (the last ones of a causal input) are not candidates. ``sink_top``: the largest ``alpha_j`` of the head (mean
  over inputs); a head with ``sink_top > sink_threshold`` has the role ``sink``. The model's sink keys are those
  any head gives more than the threshold; ``sink_mass``: a head's mass on them.
- ``noop_fraction``: the share of real queries that are no-op (Bondarenko et al. 2023): mass on the model's
  sink keys ``>= noop_mass`` (0.8) and update ``||sum_j A_ij v_j|| <= noop_update`` (0.5) x the layer's mean
  value norm ``||v_j||`` (over its heads and real tokens). NaN when the capture has no values. Role ``no-op``
  when at least half of the queries are.
- ``row_sum``, ``negative_mass``: the raw rows' mean sum, and the share of |weight| that is negative.

``js``, ``embedding``, ``clusters``: ``cluster.py``. Roles ``local`` (local_fraction >= 0.8), ``broad``
(entropy_norm >= 0.8), ``self`` (self >= 0.5) and the token roles (score >= ``role_threshold``) complete
``HeadMetrics.roles``.
"""

from __future__ import annotations

import math
from collections import Counter

import torch

from ..errors import InvalidOption, ShapeError
from . import cluster, roles
from .maps import AttentionMaps, HeadMetrics

DESCRIPTIONS = {
    "entropy": "entropy of the attention row, nats (mean over real queries)",
    "entropy_norm": "entropy / ln(keys the query sees): 1 = uniform, 0 = one key",
    "distance": "mean attention distance: sum_j p_ij d(i,j) (tokens; patches on an image grid, class token out)",
    "local_fraction": "mass within the local window (d <= w)",
    "self": "mass on the query's own token (diagonal)",
    "previous_token": "previous-token score: mass on i-1 (TransformerLens 'mul')",
    "duplicate_token": "duplicate-token score: mass on earlier copies of the query's token ('mul')",
    "induction": "induction score: mass on tokens after earlier copies of the query's token ('mul')",
    "sink_first": "mass on the first token",
    "sink_top": "largest mean mass one key receives (Gu et al. sink score alpha)",
    "sink_mass": "mass on the model's detected sink keys",
    "noop_fraction": "share of queries that are no-op: sink mass >= 0.8 and small update ||sum_j A_ij v_j||",
    "row_sum": "mean raw row sum (1 for softmax; implicit matrices may differ)",
    "negative_mass": "share of the raw weights' |mass| that is negative (clamped at 0 for every other metric)",
}


def measure(
    maps: AttentionMaps,
    *,
    local_window: float = 2,
    sink_threshold: float = 0.3,
    role_threshold: float = 0.5,
    noop_mass: float = 0.8,
    noop_update: float = 0.5,
    clusters: int = 6,
    max_rows: int = cluster.MAX_ROWS,
) -> HeadMetrics:
    """Measure every head of ``maps`` (see the module docstring for each metric and threshold)."""
    _check(maps, local_window, sink_threshold, role_threshold, noop_mass, noop_update)
    real = maps.real()  # [B, T]
    queries = _queries(maps)  # [B, T]: real queries whose row is not all 0
    p = [distributions(w) for w in maps.weights]
    dist, on_grid = distance_matrix(maps)  # [T, T], [T]: tokens counted in distances
    sinks, sink_keys, alpha_top = _sinks(maps, p, queries, sink_threshold)
    table: dict[str, torch.Tensor] = {name: torch.zeros(maps.layers, maps.heads) for name in DESCRIPTIONS}
    top = float(dist.max()) if dist.numel() else 0.0
    edges = _bin_edges(top)
    profile = torch.zeros(maps.layers, maps.heads, len(edges))
    patterns = roles.patterns(maps)
    visible = _visible(maps)  # [B, T]
    for layer, (w, pl) in enumerate(zip(maps.weights, p, strict=True)):
        row: dict[str, torch.Tensor] = {}
        h = -torch.special.xlogy(pl, pl).sum(-1)  # [B, H, T]
        row["entropy"] = _mean(h, queries)
        row["entropy_norm"] = _mean(h / visible.clamp_min(2).log()[:, None], queries & (visible > 1))
        grid_p, grid_q = _on_grid(pl, queries, on_grid)
        row["distance"] = _mean((grid_p * dist).sum(-1), grid_q)
        row["local_fraction"] = _mean((grid_p * (dist <= local_window)).sum(-1), grid_q)
        bins = _bins(dist, edges)  # [T, T] bin index
        for n in range(len(edges)):
            profile[layer, :, n] = _mean((grid_p * (bins == n)).sum(-1), grid_q)
        row["self"] = _mean(pl.diagonal(dim1=-2, dim2=-1), queries)
        for name in roles.ROLES:
            row[name] = roles.mul_score(pl, patterns[name]) if patterns[name] is not None else _nan(maps.heads)
        row["sink_first"] = _mean(pl[..., 0], queries)
        row["sink_top"] = alpha_top[layer]
        on_sinks = (pl * sink_keys[:, None, None, :]).sum(-1)  # [B, H, T]
        row["sink_mass"] = _mean(on_sinks, queries)
        row["noop_fraction"] = _noop(w, maps.values[layer], on_sinks, real, queries, noop_mass, noop_update)
        row["row_sum"] = _mean(w.sum(-1), queries)
        row["negative_mass"] = w.clamp_max(0).abs().sum((0, 2, 3)) / w.abs().sum((0, 2, 3)).clamp_min(1e-30)
        for name, value in row.items():
            table[name][layer] = value
    rows = cluster.head_rows(p, queries, max_rows)
    js = cluster.js_distances(rows)
    return HeadMetrics(
        table=table,
        descriptions=dict(DESCRIPTIONS),
        profile=profile,
        profile_bins=_bin_labels(edges, top, integer=maps.spatial_shape is None),
        sinks=sinks,
        roles=_roles(table, role_threshold, sink_threshold),
        js=js,
        embedding=cluster.classical_mds(js),
        clusters=cluster.average_linkage(js, clusters),
    )


def _check(maps: AttentionMaps, local_window, sink_threshold, role_threshold, noop_mass, noop_update) -> None:
    if not isinstance(maps, AttentionMaps) or not maps.weights:
        raise InvalidOption(f"measure() takes a non-empty AttentionMaps (from capture()); got {type(maps).__name__}")
    first = maps.weights[0].shape
    for name, w in zip(maps.layer_names, maps.weights, strict=True):
        if w.dim() != 4 or w.shape != first or w.shape[2] != w.shape[3]:
            raise ShapeError(f"layer {name}: weights {tuple(w.shape)}; every layer must be [B, H, T, T] = {first}")
    for label, value, low, high in (
        ("local_window", local_window, 0, math.inf),
        ("sink_threshold", sink_threshold, 0, 1),
        ("role_threshold", role_threshold, 0, 1),
        ("noop_mass", noop_mass, 0, 1),
        ("noop_update", noop_update, 0, math.inf),
    ):
        if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
            raise InvalidOption(f"{label}={value!r} is not valid; expected a number in [{low}, {high}]")


def distributions(w: torch.Tensor) -> torch.Tensor:
    """``w [B, H, T, T]`` as distributions: clamped at 0, rows divided by their sum (all-0 rows stay 0)."""
    w = w.float().clamp_min(0)
    total = w.sum(-1, keepdim=True)
    return torch.where(total > 0, w / total.clamp_min(1e-30), torch.zeros_like(w))


def _queries(maps: AttentionMaps) -> torch.Tensor:
    """``[B, T]``: real queries whose rows hold some positive weight in every layer and head."""
    nonzero = torch.stack([(w.clamp_min(0).sum(-1) > 0).all(1) for w in maps.weights]).all(0)
    return maps.real() & nonzero


def _visible(maps: AttentionMaps) -> torch.Tensor:
    """``[B, T]`` float: the number of real keys each query sees."""
    real = maps.real().float()
    return real.cumsum(-1) if maps.causal else real.sum(-1, keepdim=True).expand_as(real)


def distance_matrix(maps: AttentionMaps) -> tuple[torch.Tensor, torch.Tensor]:
    """(``[T, T]`` distances, ``[T]`` bool: tokens in distance metrics). A sequence: ``|i - j|``, every token.
    A grid: Euclidean between patch centres (row-major cells after ``prefix`` tokens), the prefix out."""
    t = maps.weights[0].shape[-1]
    pos = torch.arange(t, dtype=torch.float32)
    if maps.spatial_shape is None:
        return (pos[:, None] - pos[None, :]).abs(), torch.ones(t, dtype=torch.bool)
    cells = torch.stack(torch.meshgrid(*(torch.arange(s) for s in maps.spatial_shape), indexing="ij"), -1)
    coords = torch.zeros(t, len(maps.spatial_shape))
    coords[maps.prefix :] = cells.reshape(-1, len(maps.spatial_shape)).float()
    on_grid = torch.arange(t) >= maps.prefix
    return torch.cdist(coords, coords), on_grid


def _on_grid(p: torch.Tensor, queries: torch.Tensor, on_grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows restricted to the grid's keys (renormalised) and the grid's queries with mass there."""
    if on_grid.all():
        return p, queries
    g = p * on_grid
    total = g.sum(-1, keepdim=True)
    g = torch.where(total > 0, g / total.clamp_min(1e-30), torch.zeros_like(g))
    return g, queries & on_grid & (total.squeeze(-1) > 0).all(1)


def _bin_edges(top: float) -> list[float]:
    """Lower edges of the distance bins: 0, 1, 2, 4, 8, ... up to ``top``."""
    edges = [0.0, 1.0]
    while edges[-1] * 2 <= top:
        edges.append(edges[-1] * 2)
    return edges if top >= 1 else [0.0]


def _bins(dist: torch.Tensor, edges: list[float]) -> torch.Tensor:
    return torch.bucketize(dist, torch.tensor(edges[1:]), right=True)


def _bin_labels(edges: list[float], top: float, integer: bool) -> list[str]:
    """``0``, ``1``, ``2-3``, ``4-7`` ... on a sequence (the last bin ends at the largest distance); ``[1, 2)``
    ... on a grid (Euclidean distances)."""
    labels = []
    for lo, hi in zip(edges, [*edges[1:], None], strict=True):
        if integer:
            end = int(top) if hi is None else int(hi) - 1
            labels.append(f"{int(lo)}" if end == int(lo) else f"{int(lo)}-{end}")
        else:
            labels.append(f"[{lo:g}, {top:.3g}]" if hi is None else f"[{lo:g}, {hi:g})")
    labels[0] = "0"
    return labels


def _mean(x: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """``[H]``: ``x [B, H, T]`` averaged over the queries marked in ``queries [B, T]`` (NaN: none)."""
    keep = queries[:, None].expand_as(x)
    count = keep.sum((0, 2))
    total = torch.where(keep, x, torch.zeros_like(x)).sum((0, 2))
    return torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, float("nan")))


def _nan(heads: int) -> torch.Tensor:
    return torch.full((heads,), float("nan"))


def _sinks(maps: AttentionMaps, p: list[torch.Tensor], queries: torch.Tensor, threshold: float):
    """(sinks ``(position, label, mass)``, sink keys ``[B, T]`` bool, per layer ``[H]`` largest alpha)."""
    b, t = queries.shape
    q = queries.float()
    if maps.causal:  # key j is seen by the real queries i >= j
        seen = q.flip(-1).cumsum(-1).flip(-1)  # [B, T]
    else:
        seen = q.sum(-1, keepdim=True).expand(b, t)
    candidate = maps.real() & (seen >= 0.5 * q.sum(-1, keepdim=True)) & (seen > 0)
    alphas = []
    for pl in p:
        received = (pl * q[:, None, :, None]).sum(2)  # [B, H, T]: mass key j receives from real queries
        alpha = torch.where(candidate[:, None], received / seen[:, None].clamp_min(1), torch.zeros_like(received))
        alphas.append(alpha)
    alpha = torch.stack(alphas)  # [L, B, H, T]
    top = alpha.amax(-1).mean(1)  # [L, H]
    best = alpha.amax((0, 2))  # [B, T]: the most any head gives key j
    keys = best > threshold
    return _label_sinks(maps, keys, best), keys, top


def _label_sinks(maps: AttentionMaps, keys: torch.Tensor, best: torch.Tensor) -> list[tuple[int, str, float]]:
    """One ``(position, label, mass)`` per sink label (token string, or ``#position``): its most common position
    and the mean over its occurrences of the most mass one head gives it."""
    found: dict[str, list[tuple[int, float]]] = {}
    for b, j in keys.nonzero().tolist():
        label = maps.tokens[b][j] if maps.tokens is not None else f"#{j}"
        found.setdefault(label, []).append((j, float(best[b, j])))
    out = []
    for label, hits in found.items():
        position = Counter(j for j, _ in hits).most_common(1)[0][0]
        out.append((position, label, sum(m for _, m in hits) / len(hits)))
    return sorted(out, key=lambda s: -s[2])


def _noop(w, values, on_sinks, real, queries, noop_mass: float, noop_update: float) -> torch.Tensor:
    """``[H]``: share of real queries parked on the sinks (mass >= noop_mass) with a small update."""
    if values is None:
        return _nan(w.shape[1])
    v = values.float()  # [B, T, H, Dv]
    update = torch.einsum("bhij,bjhd->bhid", w.float(), v).norm(dim=-1)  # [B, H, T]
    norms = v.norm(dim=-1)  # [B, T, H]
    ref = norms[real].mean()  # the layer's mean value norm over real tokens and heads
    noop = (on_sinks >= noop_mass) & (update <= noop_update * ref)
    return _mean(noop.float(), queries)


def _roles(table: dict[str, torch.Tensor], role_threshold: float, sink_threshold: float) -> list[list[list[str]]]:
    layers, heads = table["entropy"].shape
    out = []
    for layer in range(layers):
        row = []
        for head in range(heads):
            value = {name: float(t[layer, head]) for name, t in table.items()}
            found = [name.replace("_", "-") for name in roles.ROLES if value[name] >= role_threshold]
            rules = (("sink", value["sink_top"] > sink_threshold), ("no-op", value["noop_fraction"] >= 0.5),
                     ("self", value["self"] >= 0.5), ("local", value["local_fraction"] >= 0.8),
                     ("broad", value["entropy_norm"] >= 0.8))  # fmt: skip
            row.append(found + [name for name, hit in rules if hit])
        out.append(row)
    return out
