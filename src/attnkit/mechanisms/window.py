"""Window attention — Swin Transformer: Hierarchical Vision Transformer using Shifted Windows (Liu et al., 2021,
arXiv:2103.14030), with the blocked local attention of HaloNet, Scaling Local Self-Attention for Parameter
Efficient Visual Backbones (Vaswani et al., 2021, arXiv:2103.12731), as the ``halo`` option.

    out_i = sum_{j in W(i)} softmax_j(scale * q_i . k_j) v_j
    Swin:    W(i) = the tokens of i's window on the grid cut into non-overlapping window_size windows
             (shift: the grid is rolled by -shift_size first; a token only sees tokens of its own region)
    HaloNet: W(i) = the block of i widened by `halo` tokens on each side of every axis

Choices where the papers are vague, on grids of 1, 2 or 3 axes (``spatial_dims = (1, 2, 3)``):
- A grid that does not divide into windows is padded at its end to whole windows, as Swin pads; the padded
  positions are *masked* keys (Swin's code lets its zero padding take part in the softmax, which makes the
  output depend on the padding; here a window only ever sees real tokens). HaloNet's borders are the same:
  the halo beyond the grid is masked, never read.
- ``shift`` follows Swin's cyclic shift: the padded grid is rolled by ``-shift_size`` (default
  ``window_size // 2``) on every axis, cut into windows, attended with Swin's mask (a token sees only the
  tokens of its own region, so tokens wrapped around from the far border do not mix with their new
  neighbours), and rolled back. As in Swin, an axis the window covers whole (size <= window) is not shifted.
- ``halo`` and ``shift`` do not combine (neither paper defines it): asking for both is an error.
- Swin's learned relative position bias and HaloNet's relative embeddings are trainable parts of their layers,
  not of this parameter-free mechanism: they are not included.
- A query whose keys are all padded outputs 0.

The ``windowed`` path cuts the grid into windows (HaloNet: windows of keys ``window + 2 * halo`` wide,
unfolded with stride ``window``) and runs one batched SDPA over all windows with the validity (and shift)
mask: O(T · window^d) time and memory, never a T x T tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import InvalidOption, ShapeError
from ..inputs import AttentionInputs
from ..mechanism import Complexity, Mechanism, Paper, Shape, fast_path, register_mechanism
from ..ops.reference import dense_softmax_attention
from ..ops.sdpa import sdpa
from ..ops.spatial import call_grid, from_grid, to_grid
from ..options import check_int
from ..patterns import MaskPredicate, Pattern

SizeOption = int | tuple[int, ...]


def _check_sizes(name: str, value: SizeOption | None, minimum: int) -> None:
    """One integer, or a tuple of 1 to 3 integers (one per axis), each >= minimum."""
    if value is None:
        return
    if isinstance(value, tuple):
        if not 1 <= len(value) <= 3:
            raise InvalidOption(f"window option {name}={value!r} is not valid; expected 1 to 3 sizes (one per axis)")
        for size in value:
            check_int("window", name, size, minimum=minimum)
    else:
        check_int("window", name, value, minimum=minimum)


def _check_shift_within_window(shift: SizeOption, window: SizeOption) -> None:
    """Each shift smaller than its window, where the sizes line up (one int, or tuples of one length)."""
    shifts, windows = (shift,) if isinstance(shift, int) else shift, (window,) if isinstance(window, int) else window
    if len(shifts) != len(windows) and 1 not in (len(shifts), len(windows)):
        return  # per-axis sizes for different ranks: the call's grid decides, and refuses
    n = max(len(shifts), len(windows))
    pairs = zip(shifts * (n // len(shifts)), windows * (n // len(windows)), strict=True)
    if any(s >= w for s, w in pairs):
        raise InvalidOption(f"window option shift_size={shift!r} must be smaller than window_size={window!r}")


@dataclass(frozen=True)
class WindowOptions:
    window_size: int | tuple[int, ...] = 7  # window side (Swin) / block side (HaloNet): one int or one per axis
    shift: bool = False  # Swin's shifted windows: roll the grid by shift_size before cutting it into windows
    shift_size: int | tuple[int, ...] | None = None  # cyclic shift per axis (default window_size // 2); needs shift
    halo: int = 0  # HaloNet: each block of queries also sees `halo` tokens beyond its block on every side

    def __post_init__(self):
        for name in ("window_size", "shift_size"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        _check_sizes("window_size", self.window_size, 1)
        _check_sizes("shift_size", self.shift_size, 0)
        check_int("window", "halo", self.halo, minimum=0)
        if not isinstance(self.shift, bool):
            raise InvalidOption(f"window option shift={self.shift!r} is not valid; expected True or False")
        if self.shift_size is not None and not self.shift:
            raise InvalidOption(f"window option shift_size={self.shift_size!r} needs shift=True (got shift=False)")
        if self.shift and self.shift_size is not None:
            _check_shift_within_window(self.shift_size, self.window_size)
        if self.shift and self.halo:
            raise InvalidOption(
                f"window options shift=True and halo={self.halo} do not combine: Swin shifts windows, "
                "HaloNet widens blocks; choose one"
            )


@dataclass(frozen=True)
class _Layout:
    """The windows of one call's grid: per axis the window, shift and halo, and the padded grid size."""

    shape: tuple[int, ...]
    window: tuple[int, ...]
    shift: tuple[int, ...]
    halo: int

    @property
    def padded(self) -> tuple[int, ...]:
        return tuple(-(-s // w) * w for s, w in zip(self.shape, self.window, strict=True))

    @property
    def counts(self) -> tuple[int, ...]:
        return tuple(p // w for p, w in zip(self.padded, self.window, strict=True))


def _coord(idx: torch.Tensor, shape: tuple[int, ...], axis: int) -> torch.Tensor:
    """Coordinate on ``axis`` of row-major token index ``idx``."""
    return (idx // math.prod(shape[axis + 1 :])) % shape[axis]


def _region(p: torch.Tensor, padded: int, window: int, shift: int) -> torch.Tensor:
    """Swin's mask regions on the rolled grid: [0, P - window), [P - window, P - shift), [P - shift, P)."""
    if shift == 0:
        return torch.zeros_like(p)
    return (p >= padded - window).long() + (p >= padded - shift).long()


def _windows(t: torch.Tensor, dims: int, size: tuple[int, ...], step: tuple[int, ...]) -> torch.Tensor:
    """``[B, *grid, *rest] -> [B * nW, prod(size), *rest]``: windows of ``size`` every ``step`` on each axis."""
    b, rest = t.shape[0], t.shape[1 + dims :]
    for axis in range(dims):
        t = t.unfold(1 + axis, size[axis], step[axis])  # the window axis is appended at the end
    # [B, n_1..n_d, *rest, s_1..s_d] -> [B, n_1..n_d, s_1..s_d, *rest]
    nrest = len(rest)
    perm = [0, *range(1, 1 + dims), *range(1 + dims + nrest, 1 + 2 * dims + nrest), *range(1 + dims, 1 + dims + nrest)]
    return t.permute(perm).reshape(b * math.prod(t.shape[1 : 1 + dims]), math.prod(size), *rest)


def _pad_axes(t: torch.Tensor, dims: int, before: tuple[int, ...], after: tuple[int, ...], value=0) -> torch.Tensor:
    """Pad the ``dims`` grid axes of ``[B, *grid, *rest]`` (F.pad lists the last axis first)."""
    rest = t.dim() - 1 - dims
    pads = [0, 0] * rest
    for lo, hi in zip(reversed(before), reversed(after), strict=True):
        pads += [lo, hi]
    return F.pad(t, pads, value=value) if any(pads) else t


@register_mechanism("window")
class Window(Mechanism):
    family = "spatial"
    paper = Paper("Swin Transformer: Hierarchical Vision Transformer using Shifted Windows", 2021, "2103.14030")
    patterns = frozenset({Pattern.NONCAUSAL_SELF})
    exact = True
    spatial = True
    spatial_dims = (1, 2, 3)
    complexity = Complexity(time="O(T·window^d·D)", memory="O(T·window^d)")
    Options = WindowOptions
    example_options = ({"window_size": 3}, {"window_size": 4, "shift": True}, {"window_size": 3, "halo": 1})
    fidelity_knob = ("window_size", (4, 7, 14))

    def check_call(self, x: AttentionInputs) -> None:
        super().check_call(x)
        self._layout(x.spatial_shape)  # raises on a grid rank or per-axis size count it cannot take

    def _layout(self, shape: tuple[int, ...]) -> _Layout:
        dims = len(shape)
        if dims not in self.spatial_dims:
            raise ShapeError(f"window takes grids of {self.spatial_dims} axes; got spatial_shape {shape}")
        window = self._per_axis("window_size", self.options.window_size, shape)
        shift = (0,) * dims
        if self.options.shift:
            given = self.options.shift_size
            shift = tuple(w // 2 for w in window) if given is None else self._per_axis("shift_size", given, shape)
            for s, w in zip(shift, window, strict=True):
                if s >= w:
                    raise InvalidOption(f"window: shift_size {shift} must be smaller than window_size {window}")
            # Swin: an axis the window covers whole is not shifted
            shift = tuple(0 if n <= w else s for n, w, s in zip(shape, window, shift, strict=True))
        return _Layout(shape, window, shift, self.options.halo)

    @staticmethod
    def _per_axis(name: str, value: SizeOption, shape: tuple[int, ...]) -> tuple[int, ...]:
        if isinstance(value, int):
            return (value,) * len(shape)
        if len(value) != len(shape):
            raise ShapeError(
                f"window option {name}={value} has {len(value)} sizes but spatial_shape {shape} has {len(shape)} axes"
            )
        return value

    # ---- reference: the window rule as a mask predicate over the whole grid -------------------------

    def _predicate(self, lay: _Layout) -> MaskPredicate:
        def pred(b, h, q_idx, kv_idx):
            seen = kv_idx >= 0  # every key, then the rule of each axis
            for axis, (w, s, p) in enumerate(zip(lay.window, lay.shift, lay.padded, strict=True)):
                cq, ck = _coord(q_idx, lay.shape, axis), _coord(kv_idx, lay.shape, axis)
                if lay.halo:  # HaloNet: the query's block, widened by the halo
                    start = cq // w * w
                    seen = seen & (ck >= start - lay.halo) & (ck < start + w + lay.halo)
                    continue
                rq, rk = (cq - s) % p, (ck - s) % p  # positions on the rolled grid
                same_window = rq // w == rk // w
                same_region = _region(rq, p, w, s) == _region(rk, p, w, s)
                seen = seen & same_window & same_region
            return seen

        return pred

    def mask_predicate(self, spatial_shape: tuple[int, ...]) -> MaskPredicate:
        """The window rule on a grid of this shape, as a predicate (what FlexAttention's peer runs)."""
        return self._predicate(self._layout(tuple(spatial_shape)))

    def reference(self, x: AttentionInputs):
        return dense_softmax_attention(x, self.mask_predicate(x.spatial_shape)), None

    # ---- fast path: windows -> one batched SDPA -------------------------------------------------------

    @fast_path("windowed", priority=10)
    def windowed(self, x: AttentionInputs):
        lay = self._layout(x.spatial_shape)
        dims, b = len(lay.shape), x.batch
        end = tuple(p - s for p, s in zip(lay.padded, lay.shape, strict=True))
        grid = [_pad_axes(to_grid(t, lay.shape), dims, (0,) * dims, end) for t in (x.q, x.k, x.v)]  # [B, *P, H, D]
        valid = x.key_padding_mask
        valid = torch.ones(b, x.tk, dtype=torch.bool, device=x.q.device) if valid is None else valid
        valid = _pad_axes(valid.view(b, *lay.shape), dims, (0,) * dims, end, value=False)  # [B, *P]
        labels = self._region_labels(lay, x.q.device)  # [1, *P]
        if any(lay.shift):
            axes = tuple(range(1, 1 + dims))
            grid = [t.roll([-s for s in lay.shift], axes) for t in grid]
            valid = valid.roll([-s for s in lay.shift], axes)
        q, k, v = grid
        if lay.halo:  # keys gain the halo on both sides of every axis (masked beyond the grid)
            halo = (lay.halo,) * dims
            k, v = (_pad_axes(t, dims, halo, halo) for t in (k, v))
            valid = _pad_axes(valid, dims, halo, halo, value=False)
        span = tuple(w + 2 * lay.halo for w in lay.window)
        qw = _windows(q, dims, lay.window, lay.window)  # [B*nW, Lq, Hq, Dk]
        kw, vw = (_windows(t, dims, span, lay.window) for t in (k, v))  # [B*nW, Lk, Hkv, D]
        if x.key_padding_mask is None and not any(end) and not lay.halo and not any(lay.shift):
            # whole windows of real tokens: no mask (the fused kernel's fastest case)
            return self._ungrid(sdpa(qw, kw, vw, scale=x.scale), lay, b), None
        mask = _windows(valid, dims, span, lay.window)[:, None, None, :]  # [B*nW, 1, 1, Lk]
        if any(lay.shift):
            lab = _windows(labels, dims, lay.window, lay.window)  # [nW, L]
            same = (lab[:, :, None] == lab[:, None, :]).repeat(b, 1, 1)  # [B*nW, L, L]
            mask = mask & same[:, None]  # [B*nW, 1, L, L]
        mask = mask.expand(-1, -1, qw.shape[1], -1)
        seen = mask.any(-1, keepdim=True)  # [B*nW, 1, Lq, 1]
        # a row that sees no key attends to all (finite, no NaN in any gradient), then is set to 0
        out = sdpa(qw, kw, vw, scale=x.scale, mask=mask | ~seen)  # [B*nW, Lq, Hq, Dv]
        out = torch.where(seen.transpose(1, 2), out, torch.zeros((), dtype=out.dtype, device=out.device))
        return self._ungrid(out, lay, b), None

    def _region_labels(self, lay: _Layout, device) -> torch.Tensor:
        """``[1, *padded]`` Swin region label of each position of the rolled grid (one number over all axes)."""
        label = torch.zeros((1, *lay.padded), dtype=torch.long, device=device)
        for axis, (w, s, p) in enumerate(zip(lay.window, lay.shift, lay.padded, strict=True)):
            r = _region(torch.arange(p, device=device), p, w, s)
            view = [1] * (len(lay.padded) + 1)
            view[axis + 1] = p
            label = label * 3 + r.view(view)
        return label

    @staticmethod
    def _ungrid(out: torch.Tensor, lay: _Layout, b: int) -> torch.Tensor:
        """``[B*nW, L, H, Dv]`` windows -> ``[B, T, H, Dv]`` tokens (roll back, drop the padding)."""
        dims, h, dv = len(lay.shape), out.shape[-2], out.shape[-1]
        out = out.view(b, *lay.counts, *lay.window, h, dv)
        perm = [0] + [i for axis in range(dims) for i in (1 + axis, 1 + dims + axis)] + [1 + 2 * dims, 2 + 2 * dims]
        out = out.permute(perm).reshape(b, *lay.padded, h, dv)  # [B, *P, H, Dv]
        if any(lay.shift):
            out = out.roll(list(lay.shift), tuple(range(1, 1 + dims)))
        out = out[(slice(None), *(slice(0, s) for s in lay.shape))]
        return from_grid(out)

    def flops(self, shape: Shape, pattern: Pattern) -> float:
        # keys per query: the window (plus halo) on each axis of the call's grid (else a square one of the
        # options' rank), at most the axis
        w = self.options.window_size
        grid = call_grid(shape.grid, shape.tq, 2 if isinstance(w, int) else len(w))
        sides = (w,) * len(grid) if isinstance(w, int) else w
        keys = math.prod(min(s + 2 * self.options.halo, n) for s, n in zip(sides, grid, strict=True))
        return 2.0 * shape.batch * shape.heads * shape.tq * keys * (shape.dk + shape.dv)
