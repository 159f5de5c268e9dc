"""What the analysis page carries to its scripts, kept bounded however long the inputs: the head view's
weights as the top-k keys of each query (base64 typed arrays), the thumbnails as small pooled maps, and the
summary that opens the page.

The budget: the head view holds at most ``ENTRY_BUDGET`` (query, key, weight) entries over every head and
shown input (3 bytes each before base64), so a 512-token input of a 6 x 12 model keeps 14 keys per query and
the page stays near 2 MB. Short inputs keep every key (k = T): their view is exact.
"""

from __future__ import annotations

import base64
import json
import math
from typing import Any

import torch

from ..errors import ShapeError
from .maps import AttentionMaps, HeadMetrics

ENTRY_BUDGET = 1 << 19  # (query, key) entries of the head view over all heads and inputs (3 bytes each)
MAX_K_TEXT = 16  # keys per query in the token view: beyond ~16 lines per token the extra ones are invisible
MAX_K_GRID = 256  # keys per query on a patch grid: the heatmap of a query wants most of the grid
MIN_K = 4  # fewer keys than this per query says too little; queries are cut instead (first ones kept)
MAX_INPUTS = 8  # inputs the head view offers (the metrics cover all of them)
THUMB = 32  # a thumbnail is the map average-pooled to at most THUMB x THUMB cells
MAX_KEY_INDEX = 65535  # key indices travel as uint16


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.contiguous().numpy().tobytes()).decode("ascii")


def real_positions(maps: AttentionMaps, b: int) -> torch.Tensor:
    """``[T_b]`` long: the real (non-padding) positions of input ``b``."""
    return maps.real()[b].nonzero().flatten()


def real_tokens(maps: AttentionMaps, b: int) -> list[str]:
    keep = real_positions(maps, b).tolist()
    if maps.tokens is None:
        return [str(i) for i in keep]
    return [str(maps.tokens[b][i]) for i in keep]


def head_stack(maps: AttentionMaps, b: int) -> torch.Tensor:
    """``[L*H, T_b, T_b]``: input ``b``'s weights of every head (head ``l*H + h``), real tokens only."""
    pos = real_positions(maps, b)
    stacked = torch.stack([w[b] for w in maps.weights]).float()  # [L, H, Tq, Tk]
    stacked = stacked[:, :, pos][:, :, :, pos]
    return stacked.flatten(0, 1)


def grid_of(maps: AttentionMaps, n_real: int) -> dict[str, Any] | None:
    """The patch grid the page draws for an image model (rows x cols; a 3-D grid is drawn as depth*h x w)."""
    if maps.spatial_shape is None:
        return None
    shape = tuple(int(s) for s in maps.spatial_shape)
    cells = math.prod(shape)
    if maps.prefix + cells != n_real:
        raise ShapeError(
            f"spatial_shape {shape} holds {cells} patches and prefix {maps.prefix} tokens, but an input has "
            f"{n_real} real tokens; they must add up"
        )
    rows = cells // shape[-1]
    return {"rows": rows, "cols": shape[-1], "prefix": maps.prefix, "shape": list(shape)}


def choose_k(maps: AttentionMaps) -> tuple[int, list[int], int]:
    """``(k, inputs shown, queries kept per input)`` within ENTRY_BUDGET."""
    n_heads = maps.layers * maps.heads
    lengths = [len(real_positions(maps, b)) for b in range(maps.batch)]
    q_cap = max(1, ENTRY_BUDGET // (n_heads * MIN_K))
    shown, total = [], 0
    for b, t in enumerate(lengths[:MAX_INPUTS]):
        queries = min(t, q_cap)
        if shown and (total + n_heads * queries) * MIN_K > ENTRY_BUDGET:
            break
        shown.append(b)
        total += n_heads * queries
    k_max = MAX_K_GRID if maps.spatial_shape is not None else MAX_K_TEXT
    k = max(MIN_K, min(k_max, ENTRY_BUDGET // max(total, 1)))
    return k, shown, q_cap


def top_keys(stack: torch.Tensor, k: int, q_cap: int) -> tuple[str, str, int, int]:
    """The ``k`` largest-magnitude keys of each of the first ``q_cap`` queries of ``[N, T, T]`` weights, as
    base64 of uint16 key indices and int8 weights (weight * 127, clamped to [-1, 1]): ``(idx, w, k, queries)``."""
    if stack.shape[-1] > MAX_KEY_INDEX + 1:
        raise ShapeError(f"{stack.shape[-1]} tokens: the page's head view takes at most {MAX_KEY_INDEX + 1}")
    rows = stack[:, :q_cap]  # [N, Tq, Tk]
    k = min(k, rows.shape[-1])
    _, idx = rows.abs().topk(k, dim=-1)  # [N, Tq, k]
    w = rows.gather(-1, idx)
    q8 = (w.clamp(-1, 1) * 127).round().to(torch.int8)
    return _b64(idx.to(torch.int32).to(torch.uint16)), _b64(q8), k, rows.shape[1]


def thumbnails(stack: torch.Tensor) -> tuple[str, int]:
    """Every head's map average-pooled to ``S x S`` (S = min(T, THUMB)), |weight| scaled to 0..255 per head:
    base64 of ``[N, S, S]`` uint8, and S."""
    size = min(stack.shape[-1], THUMB)
    pooled = torch.nn.functional.adaptive_avg_pool2d(stack.abs()[:, None], size)[:, 0]  # [N, S, S]
    peak = pooled.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
    return _b64((pooled / peak * 255).round().to(torch.uint8)), size


def head_view(maps: AttentionMaps) -> dict[str, Any]:
    """The head view's and the thumbnails' payload (JSON-ready)."""
    k, shown, q_cap = choose_k(maps)
    inputs = []
    for b in shown:
        stack = head_stack(maps, b)
        idx, w, kept_k, queries = top_keys(stack, k, q_cap)
        entry = {"tokens": real_tokens(maps, b), "k": kept_k, "queries": queries, "idx": idx, "w": w}
        entry["grid"] = grid_of(maps, stack.shape[-1])
        if b == shown[0]:
            entry["thumbs"], entry["thumbSize"] = thumbnails(stack)
        inputs.append(entry)
    return {"layers": maps.layers, "heads": maps.heads, "names": maps.layer_names, "inputs": inputs,
            "batch": maps.batch, "causal": maps.causal}  # fmt: skip


def to_script_json(payload: dict[str, Any]) -> str:
    """JSON safe inside ``<script type="application/json">`` (no ``</script>`` or ``<!--`` can appear)."""
    text = json.dumps(payload, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


# ---- the summary --------------------------------------------------------------------------------------------


def heads_with(metrics: HeadMetrics, role: str) -> list[tuple[int, int]]:
    return [(l, h) for l, row in enumerate(metrics.roles) for h, roles in enumerate(row) if role in roles]


def _by_layer(heads: list[tuple[int, int]]) -> str:
    counts: dict[int, int] = {}
    for l, _ in heads:
        counts[l] = counts.get(l, 0) + 1
    return ", ".join(f"layer {l}: {n}" for l, n in sorted(counts.items()))


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _names(heads: list[tuple[int, int]], limit: int = 6) -> str:
    shown = ", ".join(f"L{l}.H{h}" for l, h in heads[:limit])
    return shown + (f" and {len(heads) - limit} more" if len(heads) > limit else "")


def score_column(metrics: HeadMetrics, role: str) -> str | None:
    """The table column that scores ``role`` (its name contains the role, ignoring - _ and spaces), if any."""
    key = "".join(ch for ch in role.lower() if ch.isalnum())
    for name in metrics.table:
        if key and key in "".join(ch for ch in name.lower() if ch.isalnum()):
            return name
    return None


def _ranked(metrics: HeadMetrics, role: str, heads: list[tuple[int, int]]) -> list[tuple[int, int]]:
    column = score_column(metrics, role)
    if column is None:
        return heads
    scores = metrics.table[column].float().nan_to_num(float("-inf"))
    return sorted(heads, key=lambda lh: -float(scores[lh]))


def summary(maps: AttentionMaps, metrics: HeadMetrics) -> list[str]:
    """The page's opening: sink heads and where, the sink tokens, no-op heads, the clearest role heads."""
    total = maps.layers * maps.heads
    sinks = heads_with(metrics, "sink")
    verb = "is a sink head" if len(sinks) == 1 else "are sink heads"
    lines = [f"{len(sinks)} of {total} heads {verb}" + (f" ({_by_layer(sinks)})." if sinks else ".")]
    if metrics.sinks:
        shown = metrics.sinks[:3]
        where = "; ".join(
            f"{label} (position {pos}, up to {mass:.2f} of a head's attention)" for pos, label, mass in shown
        )
        if len(metrics.sinks) > len(shown):
            where += f"; and {len(metrics.sinks) - len(shown)} more (see the sink table)"
        lines.append(f"Sink tokens: {where}.")
    noop = heads_with(metrics, "no-op")
    lines.append(
        f"{_count(len(noop), 'no-op head')} (attention parked on a sink, small update)"
        + (f": {_names(noop)} ({_by_layer(noop)})." if noop else ".")
    )
    found = sorted({r for row in metrics.roles for roles in row for r in roles} - {"sink", "no-op"})
    for role in found:
        heads = _ranked(metrics, role, heads_with(metrics, role))
        best = "clearest" if score_column(metrics, role) else "e.g."
        lines.append(f"{_count(len(heads), role + ' head')}; {best}: {_names(heads, 3)}.")
    return lines
