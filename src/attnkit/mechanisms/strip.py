"""Strip attention — S2AFormer: Strip Self-Attention for Efficient Vision Transformer (Xu et al., 2025,
arXiv:2505.22195). Two forms on an h x w grid (``form``):

``form="ssa"`` (the default): the paper's Strip Self-Attention. K and V are reduced spatially, Q and K in channels:

    K' = DWConv_r(K),  V' = DWConv_r(V)                  (depthwise, kernel = stride = r: one key per r x r cell)
    Q~ = Q W_q,  K~ = K' W_k                             (W_q, W_k: [D, D_c], D_c = D // qk_ratio)
    out = softmax(scale · sqrt(D / D_c) · Q~ K~^T) V'    (every query over the ceil(h/r) · ceil(w/r) reduced keys)

``form="strips"``: attnkit's earlier reading of the name, attention within strips ``s`` tokens thick:

    S(r, c) = {(r', c') : r' // s == r // s}  ∪  {(r', c') : c' // s == c // s}    (its row strip and its column strip)
    out = softmax over S(r, c) of (scale q k^T) v                                  (one softmax over the union)

SSA: the paper's own code could not be read here; the abstract and secondary descriptions say K and V are reduced
by a depthwise convolution and Q and K compressed in channels by 1x1 convolutions. Choices where that leaves room:
- The reduction: a depthwise conv with bias, kernel = stride = ``reduction`` (r, default 2; PVT-style ratios 8, 4,
  2, 1 by stage are the usual choice), one filter per query head and channel (``k_reduce_weight [H, D, r, r]``,
  ``k_reduce_bias [H, D]``, the same for V), initialised as ``nn.Conv2d``. The paper reduces the block's input
  once before its K/V projection; a kernel receives k and v already projected, so each gets its own reduction.
- The compression: a linear map per head without bias (``q_compress``, ``k_compress [H, D, D_c]``, initialised as
  ``nn.Linear``), ``D_c = D // qk_ratio`` with ``qk_ratio`` (default 2) in [1, D]; the paper's ratio is not pinned
  here (``qk_ratio = D`` gives one-channel Q and K). Heads stay independent (no mixing across heads). No norm.
- The scale: the call's ``scale`` (default 1/sqrt(D), of the uncompressed q) times sqrt(D / D_c), so the default is
  1/sqrt(D_c), the usual scale for the compressed width; an explicit ``scale`` is rescaled the same way.
- Grids not divisible by r: zero-padded at the bottom and right to whole cells, so a border cell sums only the
  keys inside the grid. Key padding: a padded key counts as zero in its cell; a cell holding no real key (all
  padding, or all outside the grid) is masked, never attended; a query whose cells hold no real key outputs 0.
- GQA: k and v are repeated to the query heads, then reduced with the query head's filters. The mechanism is
  trainable (``attnkit.create("strip", heads=H, head_dim=D)``, with Dk = Dv = D).

Strips (``form="strips"``, parameter-free):
- Unlike ``cswin`` (half the heads in horizontal stripes, half in vertical ones), every head sees the union of
  its row strip and its column strip, a cross ``s`` thick, as one softmax; a key in both strips counts once.
  With ``s = 1`` this is criss-cross attention over the query's row and column.
- Grids not divisible by ``s``: the last row strip / column strip is thinner. The fast path pads the grid to whole
  strips with keys that are masked out, which is the same thing; no key outside the grid is read.
- GQA: k and v are repeated to the query heads. Key padding masks keys where they stand; a query whose cross holds
  no real key outputs 0.

Both forms: only 2-D grids (``spatial_dims = (2,)``) and ``noncausal_self``. Each option belongs to one form
(``reduction``, ``qk_ratio``: ssa; ``strip``: strips); giving it with the other form is refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidOption, ShapeError
from ..inputs import AttentionInputs
from ..mechanism import Complexity, Mechanism, Paper, Shape, fast_path, register_mechanism
from ..ops.gqa import repeat_kv
from ..ops.masking import masked_softmax
from ..ops.reference import compute_dtype, dense_softmax_attention, upcast_qkv
from ..ops.sdpa import sdpa
from ..ops.spatial import call_grid, from_grid, pad_grid, to_grid
from ..options import check_choice, check_int
from ..patterns import Pattern

SSA, STRIPS = "ssa", "strips"
FORMS = (SSA, STRIPS)
OWN_OPTIONS = {"reduction": SSA, "qk_ratio": SSA, "strip": STRIPS}  # the form each option belongs to
DEFAULTS = {"reduction": 2, "qk_ratio": 2, "strip": 1}  # filled in for the chosen form's own options
MAX_REDUCTION = 64  # a cell of 64 x 64 tokens; a larger kernel is a typo (its filters alone would be huge)


@dataclass(frozen=True)
class StripOptions:
    form: str = SSA  # "ssa": S2AFormer's strip self-attention; "strips": the query's row strip and column strip
    reduction: int | None = None  # ssa: r, kernel and stride of the depthwise conv reducing K and V (default 2)
    qk_ratio: int | None = None  # ssa: Q and K compressed from D to D // qk_ratio channels (default 2; at most D)
    strip: int | None = None  # strips: rows in a row strip, columns in a column strip (default 1: criss-cross)

    def __post_init__(self):
        check_choice("strip", "form", self.form, FORMS)
        for name, form in OWN_OPTIONS.items():
            value = getattr(self, name)
            if form != self.form and value is not None:
                raise InvalidOption(
                    f"strip option {name}={value!r} belongs to form={form!r}; this is form={self.form!r} "
                    f"(its options: {', '.join(n for n, f in OWN_OPTIONS.items() if f == self.form)})"
                )
            if form == self.form:
                value = DEFAULTS[name] if value is None else value
                object.__setattr__(self, name, value)
        if self.form == SSA:
            check_int("strip", "reduction", self.reduction, maximum=MAX_REDUCTION)
            check_int("strip", "qk_ratio", self.qk_ratio)
        else:
            check_int("strip", "strip", self.strip)


def cross_predicate(width: int, strip: int):
    """Mask predicate on row-major token indices of a grid ``width`` wide: same row strip or same column strip."""

    def pred(b, h, q_idx, kv_idx):
        same_row_strip = q_idx // width // strip == kv_idx // width // strip
        same_col_strip = q_idx % width // strip == kv_idx % width // strip
        return same_row_strip | same_col_strip

    return pred


def grid_keys_real(x: AttentionInputs) -> torch.Tensor:
    """``[B, h, w]`` bool: True where a real key stands (all True without key padding)."""
    h, w = x.spatial_shape
    if x.key_padding_mask is None:
        return torch.ones(x.batch, h, w, dtype=torch.bool, device=x.k.device)
    return x.key_padding_mask.view(x.batch, h, w)


def cells_real(real: torch.Tensor, r: int) -> torch.Tensor:
    """``[B, h, w] -> [B, ceil(h/r) * ceil(w/r)]``: does the r x r cell (row-major) hold a real key?"""
    b, h, w = real.shape
    real = F.pad(real, (0, (-w) % r, 0, (-h) % r))  # [B, h', w']: positions outside the grid False
    hr, wr = real.shape[1] // r, real.shape[2] // r
    return real.view(b, hr, r, wr, r).any(4).any(2).reshape(b, hr * wr)


@register_mechanism("strip")
class Strip(Mechanism):
    family = "spatial"
    paper = Paper("S2AFormer: Strip Self-Attention for Efficient Vision Transformer", 2025, "2505.22195")
    patterns = frozenset({Pattern.NONCAUSAL_SELF})
    exact = False
    trainable = True  # ssa's reduction filters and channel compressions
    spatial = True
    spatial_dims = (2,)
    complexity = Complexity(
        time="ssa: O(T·(T/r²)·(D/qk_ratio + D)); strips: O(T·strip·(h+w)·D)",
        memory="ssa: O(T·T/r²) (scores over the reduced keys); strips: O(T·strip·max(h, w))",
    )
    Options = StripOptions
    example_options = (
        {},
        {"reduction": 3, "qk_ratio": 4},
        {"reduction": 1, "qk_ratio": 1},
        {"form": STRIPS, "strip": 1},
        {"form": STRIPS, "strip": 2},
        {"form": STRIPS, "strip": 3},
    )
    fidelity_knob = ("reduction", (1, 2, 4, 8))

    def __init__(self, heads: int | None = None, head_dim: int | None = None, **options):
        super().__init__(heads, head_dim, **options)
        o = self.options
        if o.form != SSA:
            return
        if o.qk_ratio > head_dim:
            raise InvalidOption(
                f"strip option qk_ratio={o.qk_ratio} leaves no channel of head_dim={head_dim}; expected 1..{head_dim}"
            )
        r, compressed = o.reduction, head_dim // o.qk_ratio
        conv = 1.0 / r  # nn.Conv2d's default bound for a depthwise r x r kernel: 1/sqrt(fan_in = r * r)
        linear = 1.0 / math.sqrt(head_dim)  # nn.Linear's default bound: 1/sqrt(fan_in = D)

        def uniform(bound: float, *shape: int) -> nn.Parameter:
            return nn.Parameter(torch.empty(*shape).uniform_(-bound, bound))

        self.k_reduce_weight = uniform(conv, heads, head_dim, r, r)  # [H, D, r, r]
        self.k_reduce_bias = uniform(conv, heads, head_dim)  # [H, D]
        self.v_reduce_weight = uniform(conv, heads, head_dim, r, r)  # [H, Dv, r, r]
        self.v_reduce_bias = uniform(conv, heads, head_dim)  # [H, Dv]
        self.q_compress = uniform(linear, heads, head_dim, compressed)  # [H, D, D_c]
        self.k_compress = uniform(linear, heads, head_dim, compressed)  # [H, D, D_c]

    def check_call(self, x: AttentionInputs) -> None:
        super().check_call(x)
        shape = x.spatial_shape
        if len(shape) not in self.spatial_dims:
            raise ShapeError(f"strip takes a 2-D spatial_shape (h, w); got spatial_shape {shape} of rank {len(shape)}")
        if self.options.form == SSA:
            dk, dv = x.q.shape[-1], x.v.shape[-1]
            if (dk, dv) != (self.head_dim, self.head_dim):
                raise ShapeError(
                    f"strip (form='ssa') was created with head_dim={self.head_dim} for its filters; "
                    f"q has Dk={dk}, v has Dv={dv}"
                )

    def ssa_scale(self, x: AttentionInputs) -> float:
        """The call's scale (of the uncompressed q) times sqrt(D / D_c): 1/sqrt(D_c) by default."""
        return x.scale * math.sqrt(self.head_dim / self.q_compress.shape[-1])

    # ---- reference ----------------------------------------------------------------------------------

    def reference(self, x: AttentionInputs):
        if self.options.form == SSA:
            return self._ssa_reference(x), None
        _, w = x.spatial_shape
        return dense_softmax_attention(x, cross_predicate(w, self.options.strip)), None

    def _ssa_reference(self, x: AttentionInputs) -> torch.Tensor:
        """SSA written out: the depthwise reduction tap by tap, then dense scores over the reduced keys."""
        h, w = x.spatial_shape
        r = self.options.reduction
        q, k, v = upcast_qkv(x)  # [B, T, H, D], k and v repeated to the query heads
        real = grid_keys_real(x).reshape(x.batch, h * w)[..., None, None]  # [B, T, 1, 1]
        zero = torch.zeros((), dtype=q.dtype, device=q.device)
        k, v = torch.where(real, k, zero), torch.where(real, v, zero)  # a padded key counts as zero in its cell

        def reduce(t, weight, bias):  # K'[i, j] = bias + sum_{a, b < r} W[a, b] * K[i*r + a, j*r + b]
            grid, _ = pad_grid(to_grid(t, (h, w)), (r, r))  # [B, h', w', H, D]: zeros outside the grid
            out = bias.to(t.dtype)  # [H, D]
            for a in range(r):
                for b in range(r):
                    out = out + grid[:, a::r, b::r] * weight[:, :, a, b].to(t.dtype)
            return from_grid(out)  # [B, T/r², H, D], cells row-major

        k_cells = reduce(k, self.k_reduce_weight, self.k_reduce_bias)  # [B, S, H, D]
        v_cells = reduce(v, self.v_reduce_weight, self.v_reduce_bias)  # [B, S, H, Dv]
        q_small = torch.einsum("bthd,hdc->bthc", q, self.q_compress.to(q.dtype))  # [B, T, H, D_c]
        k_small = torch.einsum("bshd,hdc->bshc", k_cells, self.k_compress.to(q.dtype))  # [B, S, H, D_c]
        scores = torch.einsum("bthc,bshc->bhts", q_small, k_small) * self.ssa_scale(x)  # [B, H, T, S]
        seen = cells_real(grid_keys_real(x), r)[:, None, None, :]  # [B, 1, 1, S]: a cell with no real key: masked
        probs = masked_softmax(scores, seen)  # rows that see no cell are 0
        return torch.einsum("bhts,bshd->bthd", probs, v_cells).to(x.q.dtype)  # [B, T, H, Dv]

    # ---- fast path (ssa): the reduction as a strided depthwise conv, then one SDPA call over the cells -----

    @fast_path("sdpa", priority=10)
    def ssa(self, x: AttentionInputs):
        h, w = x.spatial_shape
        r = self.options.reduction
        compute = compute_dtype(x.q.dtype)
        real = grid_keys_real(x)  # [B, h, w]
        zero = torch.zeros((), dtype=compute, device=x.q.device)
        k = torch.where(real[..., None, None], to_grid(repeat_kv(x.k, x.groups).to(compute), (h, w)), zero)
        v = torch.where(real[..., None, None], to_grid(repeat_kv(x.v, x.groups).to(compute), (h, w)), zero)
        k_cells = self._reduce(k, self.k_reduce_weight, self.k_reduce_bias)  # [B, S, H, D]
        v_cells = self._reduce(v, self.v_reduce_weight, self.v_reduce_bias)  # [B, S, H, Dv]
        q_small = torch.einsum("bthd,hdc->bthc", x.q.to(compute), self.q_compress.to(compute))  # [B, T, H, D_c]
        k_small = torch.einsum("bshd,hdc->bshc", k_cells, self.k_compress.to(compute))  # [B, S, H, D_c]
        seen = cells_real(real, r)  # [B, S]
        anything = seen.any(-1)  # [B]: a batch row with no real cell attends to all (finite), zeroed below
        # no mask when every cell holds a real key: SDPA's fused kernel then runs
        mask = None if bool(seen.all()) else (seen | ~anything[:, None])[:, None, None, :]  # [B, 1, 1, S]
        # the fused CPU kernel needs one head dim for q, k and v (D_c < Dv falls back to the unfused math kernel,
        # 5x slower at 4096 x 1024): zero channels added to q and k leave every score as it is
        width = max(q_small.shape[-1], v_cells.shape[-1])
        q_small, k_small = (F.pad(t, (0, width - t.shape[-1])) for t in (q_small, k_small))
        dv = v_cells.shape[-1]
        v_cells = F.pad(v_cells, (0, width - dv))
        out = sdpa(q_small, k_small, v_cells, scale=self.ssa_scale(x), mask=mask)[..., :dv]  # [B, T, H, Dv]
        out = torch.where(anything[:, None, None, None], out, zero)
        return out.to(x.q.dtype), None

    @ssa.unsupported
    def _ssa_refuses(self, x: AttentionInputs) -> list[str]:
        return [] if self.options.form == SSA else ["the sdpa path computes form='ssa'"]

    def _reduce(self, grid: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """Depthwise conv, kernel = stride = r, of a zero-padded ``[B, h, w, H, D]`` grid -> ``[B, S, H, D]``."""
        b, h, w, hh, d = grid.shape
        r = self.options.reduction
        image = grid.reshape(b, h, w, hh * d).permute(0, 3, 1, 2)  # [B, H * D, h, w]
        image = F.pad(image, (0, (-w) % r, 0, (-h) % r))  # whole cells: zeros at the bottom and right
        kernel = weight.to(grid.dtype).reshape(hh * d, 1, r, r)
        bias = bias.to(grid.dtype).reshape(hh * d)
        cells = F.conv2d(image, kernel, bias, stride=r, groups=hh * d)  # [B, H * D, h'/r, w'/r]
        return cells.flatten(2).transpose(1, 2).reshape(b, -1, hh, d)  # [B, S, H, D], cells row-major

    # ---- fast path (strips): row strips and column strips as two batched matmuls, merged per query -------

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

    @strips.unsupported
    def _strips_refuses(self, x: AttentionInputs) -> list[str]:
        return [] if self.options.form == STRIPS else ["the strips path computes form='strips'"]

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
        h, w = call_grid(shape.grid, shape.tq)
        if self.options.form == SSA:
            r = self.options.reduction
            compressed = max(1, shape.dk // self.options.qk_ratio)
            cells = math.ceil(h / r) * math.ceil(w / r)
            reduce = cells * r * r * (shape.dk + shape.dv)  # the depthwise taps over the padded grid, K and V
            compress = (shape.tq + cells) * shape.dk * compressed  # Q and the reduced K
            attention = shape.tq * cells * (compressed + shape.dv)
            return 2.0 * shape.batch * shape.heads * (reduce + compress + attention)
        s = self.options.strip
        sh, sw = min(s, h), min(s, w)
        keys = sh * w + h * sw - sh * sw  # the row strip and the column strip, their overlap once
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
