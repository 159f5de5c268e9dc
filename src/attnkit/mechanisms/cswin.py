"""Cross-shaped window attention — CSWin Transformer: A General Vision Transformer Backbone with Cross-Shaped
Windows (Dong et al., 2022, arXiv:2107.00652). On an h x w grid, per head:

    horizontal heads: query (r, c) sees the keys (r', c') with r' // sw == r // sw   (a band of sw rows, full width)
    vertical heads:   query (r, c) sees the keys (r', c') with c' // sw == c // sw   (a band of sw columns, full height)
    out = softmax(scale q k^T) v over those keys  +  LePE(v),  LePE = a 3x3 depthwise conv of v within the stripe

The two head groups together see a cross-shaped region around each query. Choices where the paper leaves room:
- Head split: the first ceil(H/2) heads take horizontal stripes, the rest vertical (the paper: "the first group of
  heads perform self-attention in horizontal stripes"; the authors' code orders the groups the other way round, a
  permutation of the heads). With H = 1 the one head is horizontal.
- Grids not divisible by sw: the last stripe is narrower. The fast path pads the grid with keys that are masked
  out, which is the same thing; no key outside the grid is read.
- LePE (``lepe=True``, the paper's default) follows the authors' code: a 3x3 depthwise conv with bias, applied to
  each stripe as its own image (zero padding at the stripe's and the grid's borders), one filter per query head
  and value channel (parameters ``lepe_weight [H, Dv, 3, 3]``, ``lepe_bias [H, Dv]``, initialised as
  ``nn.Conv2d``), so the mechanism is trainable (``attnkit.create(..., heads=, head_dim=Dv)``); ``lepe=False``
  leaves pure stripe attention.
- GQA: k and v are repeated to the query heads (LePE then sees each query head's copy of v).
- Key padding masks keys where they stand; padded v rows are zeros for LePE too. A query whose stripe holds no
  real key outputs 0, LePE included (the contract for queries that see no key).
- Only 2-D grids (``spatial_dims = (2,)``) and ``noncausal_self``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidOption, ShapeError
from ..inputs import AttentionInputs
from ..mechanism import Complexity, Mechanism, Paper, Shape, fast_path, register_mechanism
from ..ops.gqa import repeat_kv
from ..ops.masking import visibility
from ..ops.reference import compute_dtype, dense_softmax_attention
from ..ops.sdpa import sdpa
from ..ops.spatial import call_grid, from_grid, pad_grid, to_grid
from ..options import check_int
from ..patterns import Pattern

LEPE_KERNEL = 3  # the authors' get_v: nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)


@dataclass(frozen=True)
class CSWinOptions:
    stripe: int = 7  # sw: rows in a horizontal stripe, columns in a vertical one (CSWin-T uses 1, 2, 7, 7 by stage)
    lepe: bool = True  # add LePE, the 3x3 depthwise conv of v within each stripe (the paper's default)

    def __post_init__(self):
        check_int("cswin", "stripe", self.stripe)
        if not isinstance(self.lepe, bool):
            raise InvalidOption(f"cswin option lepe={self.lepe!r} is not valid; expected True or False")


def horizontal_heads(heads: int) -> int:
    """Heads [0, ceil(H/2)) take horizontal stripes, the rest vertical ones."""
    return (heads + 1) // 2


def stripe_predicate(width: int, stripe: int, split: int):
    """Mask predicate on row-major token indices of a grid ``width`` wide: same stripe along the head's direction."""

    def pred(b, h, q_idx, kv_idx):
        same_band_of_rows = q_idx // width // stripe == kv_idx // width // stripe
        same_band_of_cols = q_idx % width // stripe == kv_idx % width // stripe
        return torch.where(h < split, same_band_of_rows, same_band_of_cols)

    return pred


@register_mechanism("cswin")
class CSWin(Mechanism):
    family = "spatial"
    paper = Paper(
        "CSWin Transformer: A General Vision Transformer Backbone with Cross-Shaped Windows", 2022, "2107.00652"
    )
    patterns = frozenset({Pattern.NONCAUSAL_SELF})
    exact = False
    trainable = True  # LePE's depthwise filters
    spatial = True
    spatial_dims = (2,)
    complexity = Complexity(time="O(T·stripe·√T·D) on a square grid", memory="O(T·D) (per stripe: (stripe·w)²)")
    Options = CSWinOptions
    example_options = ({"stripe": 2}, {"stripe": 3, "lepe": False})
    fidelity_knob = ("stripe", (1, 2, 4, 7))

    def __init__(self, heads: int | None = None, head_dim: int | None = None, **options):
        super().__init__(heads, head_dim, **options)
        if self.options.lepe:
            bound = 1.0 / LEPE_KERNEL  # nn.Conv2d's default for a depthwise 3x3 kernel: 1/sqrt(fan_in = 9)
            self.lepe_weight = nn.Parameter(
                torch.empty(heads, head_dim, LEPE_KERNEL, LEPE_KERNEL).uniform_(-bound, bound)
            )
            self.lepe_bias = nn.Parameter(torch.empty(heads, head_dim).uniform_(-bound, bound))  # [H, Dv]

    def check_call(self, x: AttentionInputs) -> None:
        super().check_call(x)
        shape = x.spatial_shape
        if len(shape) not in self.spatial_dims:
            raise ShapeError(f"cswin takes a 2-D spatial_shape (h, w); got spatial_shape {shape} of rank {len(shape)}")
        if self.options.lepe and x.v.shape[-1] != self.head_dim:
            raise ShapeError(f"cswin was created with head_dim={self.head_dim} for LePE; v has Dv={x.v.shape[-1]}")

    # ---- reference ----------------------------------------------------------------------------------

    def reference(self, x: AttentionInputs):
        h, w = x.spatial_shape
        split = horizontal_heads(x.heads)
        pred = stripe_predicate(w, self.options.stripe, split)
        out = dense_softmax_attention(x, pred).to(compute_dtype(x.q.dtype))  # [B, T, H, Dv]
        if self.options.lepe:
            out = out + from_grid(self._lepe_reference(x, split))
        sees_a_key = visibility(x, pred).any(-1).transpose(1, 2)[..., None]  # [B, T, H, 1]
        out = torch.where(sees_a_key, out, torch.zeros((), dtype=out.dtype, device=out.device))
        return out.to(x.q.dtype), None

    def _lepe_reference(self, x: AttentionInputs, split: int) -> torch.Tensor:
        """The depthwise conv written out tap by tap: a tap reads a neighbour only inside the grid and the stripe."""
        h, w = x.spatial_shape
        sw = self.options.stripe
        v = to_grid(repeat_kv(x.v, x.groups).to(compute_dtype(x.q.dtype)), (h, w))  # [B, h, w, H, Dv]
        weight, bias = self.lepe_weight.to(v.dtype), self.lepe_bias.to(v.dtype)  # [H, Dv, 3, 3], [H, Dv]
        device = v.device
        rows = torch.arange(h, device=device).view(h, 1, 1)  # [h, 1, 1]
        cols = torch.arange(w, device=device).view(1, w, 1)  # [1, w, 1]
        horizontal = (torch.arange(x.heads, device=device) < split).view(1, 1, -1)  # [1, 1, H]
        padded = F.pad(v, (0, 0, 0, 0, 1, 1, 1, 1))  # [B, h+2, w+2, H, Dv]: zeros around the grid
        out = bias.expand_as(v).clone()
        for a in (-1, 0, 1):
            for b in (-1, 0, 1):
                neighbour = padded[:, 1 + a : 1 + a + h, 1 + b : 1 + b + w]  # v[r + a, c + b]
                in_stripe = torch.where(horizontal, (rows + a) // sw == rows // sw, (cols + b) // sw == cols // sw)
                tap = weight[:, :, a + 1, b + 1] * neighbour  # [B, h, w, H, Dv]
                out = out + torch.where(in_stripe[..., None], tap, torch.zeros((), dtype=tap.dtype, device=device))
        return out

    # ---- fast path: stripes as batched SDPA calls ------------------------------------------------------

    @fast_path("sdpa", priority=10)
    def stripes(self, x: AttentionInputs):
        h, w = x.spatial_shape
        split = horizontal_heads(x.heads)
        q = to_grid(x.q, (h, w))  # [B, h, w, H, D]
        k = to_grid(repeat_kv(x.k, x.groups), (h, w))  # [B, h, w, H, D]
        v = to_grid(repeat_kv(x.v, x.groups), (h, w))  # [B, h, w, H, Dv]
        real = None if x.key_padding_mask is None else x.key_padding_mask.view(x.batch, h, w)  # [B, h, w]
        rows = slice(0, split)
        out = [self._row_stripes(x.scale, q[..., rows, :], k[..., rows, :], v[..., rows, :], real, rows)]
        if split < x.heads:  # vertical stripes are the horizontal stripes of the transposed grid
            cols = slice(split, x.heads)
            qt, kt, vt = (t[..., cols, :].transpose(1, 2) for t in (q, k, v))  # [B, w, h, Hv, D]
            real_t = None if real is None else real.transpose(1, 2)
            out.append(self._row_stripes(x.scale, qt, kt, vt, real_t, cols, transposed=True).transpose(1, 2))
        return from_grid(torch.cat(out, dim=3)).to(x.q.dtype), None  # [B, T, H, Dv]

    def _row_stripes(self, scale, q, k, v, real, heads: slice, *, transposed: bool = False) -> torch.Tensor:
        """Attention within bands of ``stripe`` rows of ``[B, n, m, Hg, D]`` grids, one SDPA call over all bands;
        the grid is padded to whole bands with masked keys (``transposed``: the grid is the caller's with its axes
        swapped, so LePE's taps are too). Returns ``[B, n, m, Hg, Dv]`` in the compute dtype."""
        b, n, m, hg, _ = q.shape
        sw = min(self.options.stripe, n)  # a stripe at least as wide as the grid is the whole grid: no padding
        dv = v.shape[-1]
        if real is None and n % sw:
            real = torch.ones(b, n, m, dtype=torch.bool, device=q.device)
        (q, k, v), _ = zip(*(pad_grid(t, (sw, 1)) for t in (q, k, v)), strict=True)  # [B, n', m, Hg, D]
        bands = q.shape[1] // sw

        def fold(t):  # [B, n', m, Hg, D] -> [B * bands, sw * m, Hg, D]: one band a batch row
            return t.reshape(b * bands, sw * m, hg, t.shape[-1])

        mask = seen = None
        if real is not None:
            real = F.pad(real, (0, 0, 0, q.shape[1] - n)).reshape(b * bands, sw * m)  # padded rows: False
            seen = real.any(-1)  # [B * bands]: does the band hold a real key?
            # a band with no real key attends to all (finite) and is zeroed below: SDPA never sees an empty row
            mask = (real | ~seen[:, None])[:, None, None, :]  # [B * bands, 1, 1, sw * m]
        out = sdpa(fold(q), fold(k), fold(v), scale=scale, mask=mask)  # [B * bands, sw * m, Hg, Dv]
        out = out.to(compute_dtype(q.dtype))
        if self.options.lepe:
            out = out + self._lepe(fold(v), sw, m, heads, transposed)
        if seen is not None:
            out = torch.where(seen[:, None, None, None], out, torch.zeros((), dtype=out.dtype, device=out.device))
        return out.reshape(b, bands * sw, m, hg, dv)[:, :n]

    def _lepe(self, v: torch.Tensor, sw: int, m: int, heads: slice, transposed: bool) -> torch.Tensor:
        """LePE of each band as its own ``sw x m`` image: ``[B', sw * m, Hg, Dv] -> [B', sw * m, Hg, Dv]``."""
        bb, _, hg, dv = v.shape
        v = v.to(compute_dtype(v.dtype))
        image = v.reshape(bb, sw, m, hg * dv).permute(0, 3, 1, 2)  # [B', Hg * Dv, sw, m]
        weight = self.lepe_weight[heads].to(v.dtype)  # [Hg, Dv, 3, 3]
        weight = (weight.transpose(-1, -2) if transposed else weight).reshape(hg * dv, 1, LEPE_KERNEL, LEPE_KERNEL)
        bias = self.lepe_bias[heads].to(v.dtype).reshape(hg * dv)
        lepe = F.conv2d(image, weight, bias, padding=LEPE_KERNEL // 2, groups=hg * dv)  # [B', Hg * Dv, sw, m]
        return lepe.permute(0, 2, 3, 1).reshape(bb, sw * m, hg, dv)

    def flops(self, shape: Shape, pattern: Pattern) -> float:
        h, w = call_grid(shape.grid, shape.tq)
        sw = self.options.stripe
        keys = (min(sw, h) * w + h * min(sw, w)) / 2  # keys a query sees in its stripe: half the heads each way
        attention = shape.tq * keys * (shape.dk + shape.dv)
        lepe = shape.tq * shape.dv * LEPE_KERNEL**2 if self.options.lepe else 0
        return 2.0 * shape.batch * shape.heads * (attention + lepe)
