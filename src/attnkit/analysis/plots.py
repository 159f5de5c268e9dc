"""PNG plots of one analysis (matplotlib, drawn on figures without pyplot, so the Agg canvas and no display):
an L x H heatmap per metric, attention strength against distance per head coloured by layer, the cluster map
(the heads' 2-D embedding coloured by cluster, labelled L.H) and the attention matrices of a few heads.

:func:`render_plots` gives the PNG bytes (the page embeds them); :func:`save_plots` writes them as files.
:func:`check_views` refuses an :class:`AttentionMaps` / :class:`HeadMetrics` pair that does not fit together.
"""

from __future__ import annotations

import io
import logging
import re
from pathlib import Path

import torch

from ..errors import AttnkitError, ShapeError
from ..viz import CELLS, colour_scale
from .maps import AttentionMaps, HeadMetrics

log = logging.getLogger(__name__)

DPI = 100
MAX_HEAD_PLOTS = 4  # attention matrices of a few heads: the clearest role of each kind, then the first heads
ROLE_ORDER = ("previous-token", "induction", "duplicate-token", "sink", "no-op", "local", "broad")


# ---- validation ---------------------------------------------------------------------------------------------


def check_views(maps: AttentionMaps, metrics: HeadMetrics) -> tuple[int, int]:
    """``(L, H)`` when the maps and their metrics fit together; ShapeError naming the first mismatch."""
    if not isinstance(maps, AttentionMaps) or not isinstance(metrics, HeadMetrics):
        raise AttnkitError(
            f"expected an AttentionMaps and a HeadMetrics, got {type(maps).__name__} and {type(metrics).__name__}"
        )
    if not maps.weights:
        raise ShapeError("the AttentionMaps hold no layers (weights is empty); capture at least one layer")
    first = tuple(maps.weights[0].shape)
    for i, w in enumerate(maps.weights):
        if w.dim() != 4 or tuple(w.shape) != first:
            raise ShapeError(f"weights[{i}] has shape {tuple(w.shape)}; every layer must be [B, H, Tq, Tk] = {first}")
    layers, heads = maps.layers, maps.heads
    for name, t in metrics.table.items():
        if tuple(t.shape) != (layers, heads):
            raise ShapeError(f"metric {name!r} has shape {tuple(t.shape)}, expected [L, H] = [{layers}, {heads}]")
    if metrics.profile.dim() != 3 or tuple(metrics.profile.shape[:2]) != (layers, heads):
        raise ShapeError(f"profile has shape {tuple(metrics.profile.shape)}, expected [{layers}, {heads}, bins]")
    if metrics.profile.shape[2] != len(metrics.profile_bins):
        raise ShapeError(f"profile has {metrics.profile.shape[2]} bins but {len(metrics.profile_bins)} bin labels")
    n = layers * heads
    if tuple(metrics.embedding.shape) != (n, 2) or tuple(metrics.clusters.shape) != (n,):
        raise ShapeError(
            f"embedding {tuple(metrics.embedding.shape)} and clusters {tuple(metrics.clusters.shape)} must be "
            f"[L*H, 2] and [L*H] = [{n}, 2] and [{n}]"
        )
    if len(metrics.roles) != layers or any(len(row) != heads for row in metrics.roles):
        raise ShapeError(f"roles must be {layers} lists of {heads} lists of role names")
    if maps.tokens is not None and len(maps.tokens) != maps.batch:
        raise ShapeError(f"tokens has {len(maps.tokens)} inputs, the weights {maps.batch}")
    return layers, heads


# ---- figures ------------------------------------------------------------------------------------------------


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "metric"


def metric_figure(name: str, values: torch.Tensor, description: str = ""):
    """An L x H heatmap of one metric, the value written in each cell when there are few."""
    from matplotlib.figure import Figure

    layers, heads = values.shape
    fig = Figure(figsize=(max(4.0, 0.5 * heads + 2), max(2.6, 0.4 * layers + 1.4)), layout="constrained")
    ax = fig.subplots()
    finite = values.float().nan_to_num(0.0)
    image = ax.imshow(finite.numpy(), cmap="viridis", aspect="auto", **CELLS)
    if layers * heads <= 200:
        mid = float(finite.min() + finite.max()) / 2
        for l in range(layers):
            for h in range(heads):
                v = float(finite[l, h])
                ax.text(h, l, f"{v:.2g}", ha="center", va="center", fontsize=6, color="k" if v > mid else "w")
    ax.set(xlabel="head", ylabel="layer", title=name if not description else f"{name}\n{description}")
    ax.title.set_fontsize(9)
    ax.set_xticks(range(heads))
    ax.set_yticks(range(layers))
    fig.colorbar(image, ax=ax, shrink=0.85)
    return fig


def profile_figure(profile: torch.Tensor, bins: list[str]):
    """Attention mass at each distance bin, one curve per head, coloured by layer."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    layers, heads, n = profile.shape
    fig = Figure(figsize=(7.0, 4.2), layout="constrained")
    ax = fig.subplots()
    cmap = colormaps["viridis"]
    for l in range(layers):
        colour = cmap(l / max(layers - 1, 1))
        for h in range(heads):
            label = None if h else f"L{l}"
            ax.plot(range(n), profile[l, h].numpy(), color=colour, alpha=0.55, linewidth=1, label=label)
    step = max(1, n // 12)
    ax.set_xticks(range(0, n, step))
    ax.set_xticklabels(bins[::step], rotation=45, fontsize=7)
    ax.set(xlabel="distance (tokens, or grid cells for an image model)", ylabel="attention mass")
    ax.set_title("Attention against distance, per head")
    ax.legend(fontsize=7, ncols=2, title="layer", title_fontsize=7)
    return fig


def cluster_figure(embedding: torch.Tensor, clusters: torch.Tensor, heads: int):
    """The heads' 2-D embedding (MDS of Jensen-Shannon distances) coloured by cluster, each point labelled L.H."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 5.4), layout="constrained")
    ax = fig.subplots()
    cmap = colormaps["tab10"]
    xy = embedding.float()
    ax.scatter(xy[:, 0].numpy(), xy[:, 1].numpy(), c=[cmap(int(c) % 10) for c in clusters], s=28)
    if len(xy) <= 200:
        for i, (x, y) in enumerate(xy.tolist()):
            ax.annotate(f"{i // heads}.{i % heads}", (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")
    ax.set(title="Heads by Jensen-Shannon distance (MDS), coloured by cluster", xlabel="MDS 1", ylabel="MDS 2")
    ax.title.set_fontsize(9)
    return fig


def head_figure(maps: AttentionMaps, picks: list[tuple[int, int, str]]):
    """The attention matrices of the picked heads on the first input (real tokens only)."""
    from matplotlib.figure import Figure

    real = maps.real()[0]
    tokens = _real_tokens(maps, 0)
    fig = Figure(figsize=(4.2 * len(picks), 4.6), layout="constrained")
    axes = fig.subplots(1, len(picks), squeeze=False)[0]
    for ax, (l, h, why) in zip(axes, picks, strict=True):
        w = maps.weights[l][0, h][real][:, real]  # [T, T] real queries x real keys
        values, cmap, norm, _ = colour_scale(w)
        ax.imshow(values, cmap=cmap, norm=norm, **CELLS)
        ax.set_title(f"L{l}.H{h}" + (f" ({why})" if why else ""), fontsize=9)
        if len(tokens) <= 40:
            ax.set_xticks(range(len(tokens)), tokens, rotation=90, fontsize=6)
            ax.set_yticks(range(len(tokens)), tokens, fontsize=6)
        else:
            ax.set(xlabel="key", ylabel="query")
    return fig


def _real_tokens(maps: AttentionMaps, b: int) -> list[str]:
    real = maps.real()[b].tolist()
    if maps.tokens is None:
        return [str(i) for i, keep in enumerate(real) if keep]
    return [t for t, keep in zip(maps.tokens[b], real, strict=True) if keep]


def pick_heads(metrics: HeadMetrics, limit: int = MAX_HEAD_PLOTS) -> list[tuple[int, int, str]]:
    """A few heads worth looking at: the first head of each role (in ROLE_ORDER, then other roles), then the
    first heads in order; ``(layer, head, role or "")``."""
    found: dict[str, tuple[int, int]] = {}
    for l, row in enumerate(metrics.roles):
        for h, roles in enumerate(row):
            for role in roles:
                found.setdefault(role, (l, h))
    ordered = [r for r in ROLE_ORDER if r in found] + sorted(r for r in found if r not in ROLE_ORDER)
    picks: list[tuple[int, int, str]] = []
    for role in ordered:
        l, h = found[role]
        if all((l, h) != (pl, ph) for pl, ph, _ in picks):
            picks.append((l, h, role))
    heads = len(metrics.roles[0]) if metrics.roles else 0
    for i in range(len(metrics.roles) * heads):
        if all((i // heads, i % heads) != (pl, ph) for pl, ph, _ in picks):
            picks.append((i // heads, i % heads, ""))
    return picks[:limit]


def render_plots(maps: AttentionMaps, metrics: HeadMetrics) -> dict[str, bytes]:
    """Every plot as PNG bytes, by file stem: ``metric-<name>`` per metric, ``distance-profile``, ``clusters``,
    ``heads``."""
    _, heads = check_views(maps, metrics)
    out: dict[str, bytes] = {}
    for name, values in metrics.table.items():
        out[f"metric-{_slug(name)}"] = _png(metric_figure(name, values, metrics.descriptions.get(name, "")))
    out["distance-profile"] = _png(profile_figure(metrics.profile, metrics.profile_bins))
    out["clusters"] = _png(cluster_figure(metrics.embedding, metrics.clusters, heads))
    out["heads"] = _png(head_figure(maps, pick_heads(metrics)))
    return out


def save_plots(maps: AttentionMaps, metrics: HeadMetrics, out_dir: str | Path) -> list[Path]:
    """Write every plot of :func:`render_plots` as ``out_dir/<stem>.png`` (folder made as needed); the paths."""
    images = render_plots(maps, metrics)
    folder = Path(out_dir)
    written = []
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for stem, data in images.items():
            path = folder / f"{stem}.png"
            path.write_bytes(data)
            written.append(path)
    except OSError as err:
        raise AttnkitError(f"cannot write the plots to {folder}: {err.strerror or err}; choose another --out") from None
    log.info("wrote %d plots to %s", len(written), folder)
    return written
