"""Strip attention — named after S2AFormer: Strip Self-Attention for Efficient Vision Transformer (Xu et al., 2025,
arXiv:2505.22195). On an h x w grid with strips ``s`` tokens thick, every head, query (r, c) sees

    S(r, c) = {(r', c') : r' // s == r // s}  ∪  {(r', c') : c' // s == c // s}    (its row strip and its column strip)
    out = softmax over S(r, c) of (scale q k^T) v                                  (one softmax over the union)

What this is, and where the paper leaves room (or says something else):
- The S2AFormer abstract only says SSA "reduces the spatial dimensions of K and V while compressing the channel
  dimensions of Q and K" (a strided depthwise conv on K, V and a narrower Q, K projection, which live in the
  surrounding layer, not in an attention kernel). attnkit's catalogue defines ``strip`` as attention within
  strips along rows and columns, and that is what this computes: the mask above, not the paper's K/V reduction.
- Unlike ``cswin`` (half the heads in horizontal stripes, half in vertical ones), every head sees the union of
  its row strip and its column strip, a cross ``s`` thick, as one softmax; a key in both strips counts once.
  With ``s = 1`` this is criss-cross attention over the query's row and column.
- Grids not divisible by ``s``: the last row strip / column strip is thinner. The fast path pads the grid to whole
  strips with keys that are masked out, which is the same thing; no key outside the grid is read.
- GQA: k and v are repeated to the query heads. Key padding masks keys where they stand; a query whose cross holds
  no real key outputs 0.
- Only 2-D grids (``spatial_dims = (2,)``) and ``noncausal_self``; no parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import ShapeError
from ..inputs import AttentionInputs
from ..mechanism import Complexity, Mechanism, Paper, Shape, fast_path, register_mechanism
from ..ops.gqa import repeat_kv
from ..ops.reference import compute_dtype, dense_softmax_attention
from ..ops.spatial import from_grid, pad_grid, to_grid
from ..options import check_int
from ..patterns import Pattern


@dataclass(frozen=True)
class StripOptions:
    strip: int = 1  # s: rows in a row strip, columns in a column strip (1: the query's own row and column)

    def __post_init__(self):
        check_int("strip", "strip", self.strip)


def cross_predicate(width: int, strip: int):
    """Mask predicate on row-major token indices of a grid ``width`` wide: same row strip or same column strip."""

    def pred(b, h, q_idx, kv_idx):
        same_row_strip = q_idx // width // strip == kv_idx // width // strip
        same_col_strip = q_idx % width // strip == kv_idx % width // strip
        return same_row_strip | same_col_strip

    return pred


@register_mechanism("strip")
class Strip(Mechanism):
    family = "spatial"
    paper = Paper("S2AFormer: Strip Self-Attention for Efficient Vision Transformer", 2025, "2505.22195")
    patterns = frozenset({Pattern.NONCAUSAL_SELF})
    exact = False
    spatial = True
    spatial_dims = (2,)
    complexity = Complexity(time="O(T·strip·(h+w)·D)", memory="O(T·strip·max(h, w)) (one strip's scores per query)")
    Options = StripOptions
    example_options = ({"strip": 1}, {"strip": 2}, {"strip": 3})
    fidelity_knob = ("strip", (1, 2, 4, 7))

    def check_call(self, x: AttentionInputs) -> None:
        super().check_call(x)
        shape = x.spatial_shape
        if len(shape) not in self.spatial_dims:
            raise ShapeError(f"strip takes a 2-D spatial_shape (h, w); got spatial_shape {shape} of rank {len(shape)}")

    # ---- reference ----------------------------------------------------------------------------------

    def reference(self, x: AttentionInputs):
        _, w = x.spatial_shape
        return dense_softmax_attention(x, cross_predicate(w, self.options.strip)), None

    # ---- fast path: row strips and column strips as two batched matmuls, merged per query ---------------

    @fast_path("strips", priority=10)
    def strips(self, x: AttentionInputs):
        h, w = x.spatial_shape
        s = self.options.strip
        compute = compute_dtype(x.q.dtype)
        q = to_grid(x.q.to(compute), (h, w))  # [B, h, w, H, D]
        k = to_grid(repeat_kv(x.k, x.groups).to(compute), (h, w))  # [B, h, w, H, D]
        v = to_grid(repeat_kv(x.v, x.groups).to(compute), (h, w))  # [B, h, w, H, Dv]
        real = torch.ones(x.batch, h, w, dtype=torch.bool, device=q.device)
        if x.key_padding_mask is not None:
            real = x.key_padding_mask.view(x.batch, h, w)
        (q, k, v), _ = zip(*(pad_grid(t, (s, s)) for t in (q, k, v)), strict=True)  # [B, h', w', H, D]
        hp, wp = q.shape[1], q.shape[2]
        real = torch.nn.functional.pad(real, (0, wp - w, 0, hp - h))  # [B, h', w']: padded positions False
        zero = torch.zeros((), dtype=compute, device=q.device)
        k = torch.where(real[..., None, None], k, zero)  # NaN in padded keys never reaches a product
        v = torch.where(real[..., None, None], v, zero)
        rows = self._strip_parts(x.scale, q, k, v, real, s, exclude_row_strip=False)
        cols = self._strip_parts(
            x.scale, *(t.transpose(1, 2) for t in (q, k, v, real)), s, exclude_row_strip=True
        )  # the column strips are the row strips of the transposed grid
        cols = tuple(t.transpose(1, 2) for t in cols)
        out = merge_parts(rows, cols)  # [B, h', w', H, Dv]
        return from_grid(out[:, :h, :w].contiguous()).to(x.q.dtype), None

    @staticmethod
    def _strip_parts(scale, q, k, v, real, s: int, *, exclude_row_strip: bool):
        """Partial softmax of each query over the keys of its strip of ``s`` rows in ``[B, n, m, H, D]`` grids (n a
        multiple of ``s``). ``exclude_row_strip``: the grid is the caller's transposed (its columns are the caller's
        rows), and a key in the query's strip along the m axis is left out: the other part already counted it.
        Returns the max score ``[B, n, m, H]`` (-inf where no key is visible), the sum of exp ``[B, n, m, H]`` and
        the unnormalised output ``[B, n, m, H, Dv]``."""
        b, n, m, hh, d = q.shape
        dv = v.shape[-1]
        bands = n // s

        def fold(t):  # [B, n, m, H, D] -> [B, bands, H, s * m, D]: one strip a batch row
            return t.reshape(b, bands, s * m, hh, t.shape[-1]).transpose(2, 3)

        scores = fold(q) @ fold(k).transpose(-1, -2) * scale  # [B, bands, H, s*m, s*m]
        visible = real.reshape(b, bands, 1, 1, s * m)  # [B, bands, 1, 1, s*m]
        if exclude_row_strip:  # the other axis is m: a key whose index along it shares the query's strip is taken
            along = torch.arange(s * m, device=q.device) % m // s  # [s*m]
            visible = visible & (along[:, None] != along[None, :])  # [B, bands, 1, s*m, s*m]
        scores = torch.where(visible, scores, torch.full((), float("-inf"), dtype=scores.dtype, device=q.device))
        top = scores.amax(-1, keepdim=True)  # [B, bands, H, s*m, 1]; -inf for a query that sees no key here
        p = torch.exp(scores - finite(top))  # masked keys: exp(-inf) = 0
        total = p.sum(-1)  # [B, bands, H, s*m]
        out = p @ fold(v)  # [B, bands, H, s*m, Dv]

        def unfold(t, last):  # [B, bands, H, s*m, last] -> [B, n, m, H, last]
            return t.transpose(2, 3).reshape(b, n, m, hh, last)

        return unfold(top, 1)[..., 0], unfold(total[..., None], 1)[..., 0], unfold(out, dv)

    def flops(self, shape: Shape, pattern: Pattern) -> float:
        side = math.sqrt(shape.tq)  # the grid is not in Shape: a square one is assumed
        s = min(self.options.strip, side)
        keys = 2 * s * side - s * s  # the row strip and the column strip, their overlap once
        return 2.0 * shape.batch * shape.heads * shape.tq * keys * (shape.dk + shape.dv)


def merge_parts(a, b) -> torch.Tensor:
    """One softmax from two partial ones over disjoint key sets (max, sum of exp, unnormalised output each);
    a query with no visible key in either outputs 0."""
    top_a, total_a, out_a = a
    top_b, total_b, out_b = b
    top = finite(torch.maximum(top_a, top_b))
    wa, wb = torch.exp(top_a - top), torch.exp(top_b - top)  # [B, n, m, H]; an empty part: exp(-inf) = 0
    total = total_a * wa + total_b * wb
    out = out_a * wa[..., None] + out_b * wb[..., None]
    safe = torch.where(total > 0, total, torch.ones((), dtype=total.dtype, device=total.device))
    return out / safe[..., None]


def finite(t: torch.Tensor) -> torch.Tensor:
    """-inf (no visible key) replaced by 0, so subtracting it never makes inf - inf."""
    return torch.where(torch.isfinite(t), t, torch.zeros((), dtype=t.dtype, device=t.device))
