"""Validated attention inputs, shared by the reference and every fast path.

All checks happen here, before any compute, for every path (DESIGN §1.6): a fast path never sees
inputs that were not validated. The checks look only at shapes, dtypes and devices, never at
values, so they cost microseconds and never synchronise a GPU. One transform happens here too: the
rows of padded keys are zeroed (``zero_padded``), so no path can pass on a NaN they hold.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Protocol

import torch

from .errors import DTypeError, InvalidOption, ShapeError, UnsupportedPattern
from .patterns import Pattern, as_pattern
from .state import Provenance, State


class MechanismLike(Protocol):
    """What validation reads of a mechanism (``attnkit.mechanism.Mechanism`` has it all; naming that class
    here would make the two modules import each other)."""

    name: str
    patterns: frozenset[Pattern]
    uses_scale: bool
    spatial: bool
    state_kind: type[State] | None

    def check_state(self, state: State, k: torch.Tensor, v: torch.Tensor) -> None: ...

    def provenance(self, batch: int, heads: int | None, kv_heads: int, dk: int, dv: int) -> Provenance: ...


FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@dataclass(frozen=True)
class AttentionInputs:
    """One call's inputs after validation (and, for cached mechanisms, after joining the cache).

    Shapes: ``q [B, Tq, Hq, Dk]``, ``k [B, Tk, Hkv, Dk]``, ``v [B, Tk, Hkv, Dv]``. Query ``i`` sits at
    key position ``i + q_offset`` (non-zero only when a KV cache was prepended in causal_self).
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    pattern: Pattern
    scale: float
    key_padding_mask: torch.Tensor | None  # [B, Tk] bool, True = real token
    state: State | None  # recurrent state to start from (cached mechanisms: already joined)
    want_state: bool  # the caller asked for the final state
    q_offset: int = 0
    spatial_shape: tuple[int, ...] | None = None

    @property
    def batch(self) -> int:
        return self.q.shape[0]

    @property
    def tq(self) -> int:
        return self.q.shape[1]

    @property
    def tk(self) -> int:
        return self.k.shape[1]

    @property
    def heads(self) -> int:
        return self.q.shape[2]

    @property
    def kv_heads(self) -> int:
        return self.k.shape[2]

    @property
    def groups(self) -> int:
        """Query heads per key/value head (GQA)."""
        return self.q.shape[2] // self.k.shape[2]

    def replace(self, **changes) -> AttentionInputs:
        return dataclasses.replace(self, **changes)


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def check_scale(scale: object) -> None:
    """Raise InvalidOption unless ``scale`` is a positive finite number."""
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale) or scale <= 0:
        raise InvalidOption(f"scale must be a positive finite number; got {scale!r}")


def validate(
    mech: MechanismLike,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    pattern: Pattern | str,
    scale: float | None,
    key_padding_mask: torch.Tensor | None,
    state: State | None,
    return_state: bool,
    spatial_shape: tuple[int, ...] | None,
) -> AttentionInputs:
    """Check one call against the contract of DESIGN §1 and return its ``AttentionInputs``."""
    name = mech.name
    pattern = as_pattern(pattern)

    for label, t, layout in (
        ("q", q, "[B, Tq, Hq, Dk]"),
        ("k", k, "[B, Tk, Hkv, Dk]"),
        ("v", v, "[B, Tk, Hkv, Dv]"),
    ):
        if not isinstance(t, torch.Tensor):
            raise DTypeError(f"{label} must be a torch.Tensor {layout}; got {type(t).__name__}")
        if t.dim() != 4:
            raise ShapeError(f"{label} must be 4-D {layout}; got shape {_shape(t)}")
        if t.dtype not in FLOAT_DTYPES:
            raise DTypeError(f"{label} has dtype {t.dtype}; expected one of float32, bfloat16, float16, float64")
    if not (q.dtype == k.dtype == v.dtype):
        raise DTypeError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise DTypeError(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")

    bq, tq, hq, dq = q.shape
    bk, tk, hk, dk = k.shape
    if bq != bk or bk != v.shape[0]:
        raise ShapeError(f"q, k, v must share the batch size; got {bq}, {bk}, {v.shape[0]}")
    if v.shape[1] != tk:
        raise ShapeError(f"k and v must have the same length; got k {tk} tokens and v {v.shape[1]}")
    if v.shape[2] != hk:
        raise ShapeError(f"k and v must have the same number of heads; got k {hk} and v {v.shape[2]}")
    if dq != dk:
        raise ShapeError(f"q and k must have the same head dim; got q {dq} and k {dk}")
    if dk == 0:
        raise ShapeError(f"q and k need a head dim of at least 1 (the scale is 1/sqrt(Dk)); got Dk={dk}")
    if v.shape[3] == 0:
        raise ShapeError(f"v needs a value head dim of at least 1; got Dv={v.shape[3]}")
    if hq == 0:
        raise ShapeError("q has 0 heads; it needs at least one")
    if hk == 0 or hq % hk != 0:
        raise ShapeError(f"q has {hq} heads but k has {hk}; q heads must be a multiple of k heads")
    if min(tq, tk) == 0:
        raise ShapeError(f"q and k need at least one token; got Tq={tq}, Tk={tk}")

    check_pattern(mech, pattern)
    if pattern.is_self and tq != tk:
        raise ShapeError(
            f"{pattern.value} needs as many queries as keys; got Tq={tq}, Tk={tk}"
            " (use a cross pattern for a separate context)"
        )

    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
            got = key_padding_mask.dtype if isinstance(key_padding_mask, torch.Tensor) else type(key_padding_mask)
            raise DTypeError(f"key_padding_mask must be a bool tensor (True = real token); got {got}")
        if tuple(key_padding_mask.shape) != (bk, tk):
            raise ShapeError(f"key_padding_mask must have shape [B, Tk] = ({bk}, {tk}); got {_shape(key_padding_mask)}")
        if key_padding_mask.device != k.device:
            raise DTypeError(f"key_padding_mask is on {key_padding_mask.device} but k is on {k.device}")

    if state is not None or return_state:
        _check_state(mech, pattern, q, k, v, state)

    if scale is None:
        scale = 1.0 / math.sqrt(dk)
    elif not mech.uses_scale:
        raise InvalidOption(f"{name} does not use a score scale; got scale={scale!r} (leave it None)")
    else:
        check_scale(scale)

    spatial_shape = _check_spatial(mech, spatial_shape, tq)
    _check_grid_form(mech, spatial_shape, pattern)
    if key_padding_mask is not None:
        k, v = zero_padded(k, v, key_padding_mask)
    return AttentionInputs(
        q=q,
        k=k,
        v=v,
        pattern=pattern,
        scale=float(scale),
        key_padding_mask=key_padding_mask,
        state=state,
        want_state=return_state,
        spatial_shape=spatial_shape,
    )


def zero_padded(k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``k``, ``v`` with the rows of padded keys set to 0, by selection (``0 * NaN`` is NaN), before any path
    runs: whatever a padded row holds (NaN, inf, garbage), no path and no state can pass it on. The output
    does not depend on those rows, and their gradient is 0 accordingly. Queries are not touched."""
    keep = key_padding_mask[:, :, None, None]  # [B, Tk, 1, 1]
    zero = torch.zeros((), dtype=k.dtype, device=k.device)
    return torch.where(keep, k, zero), torch.where(keep, v, zero)


def check_pattern(mech: MechanismLike | type[MechanismLike], pattern: Pattern) -> None:
    """Raise UnsupportedPattern naming the mechanism, the pattern and the patterns it does support."""
    if pattern not in mech.patterns:
        supported = ", ".join(sorted(p.value for p in mech.patterns))
        raise UnsupportedPattern(f"{mech.name} does not support pattern {pattern.value}; it supports: {supported}")


def _check_state(
    mech: MechanismLike, pattern: Pattern, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: State | None
) -> None:
    if mech.state_kind is None:
        raise InvalidOption(f"{mech.name} has no decoding state; call it without state= and return_state=")
    if pattern is not Pattern.CAUSAL_SELF:
        raise InvalidOption(
            f"decoding state is defined for causal_self only; got pattern {pattern.value}"
            " (cross attention needs no state: pass the whole context each call)"
        )
    if state is None:
        return
    if not isinstance(state, mech.state_kind):
        made = getattr(state, "made_by", None)
        maker = f" made by {made.describe()}" if made is not None else ""
        raise InvalidOption(
            f"{mech.name} expects a {mech.state_kind.__name__} state; got a {type(state).__name__}{maker}"
        )
    # provenance: the same mechanism and options, the same sizes (the one place this is checked)
    state.check_continued_by(mech.provenance(q.shape[0], q.shape[2], k.shape[2], k.shape[3], v.shape[3]))
    mech.check_state(state, k, v)


def _check_grid_form(mech: MechanismLike, spatial_shape: tuple[int, ...] | None, pattern: Pattern) -> None:
    """A sequence mechanism with a grid form takes a grid of its ranks, in the patterns that form is defined for."""
    ranks = getattr(mech, "grid_dims", ())
    if mech.spatial or not ranks or spatial_shape is None or len(spatial_shape) == 1:
        return  # a 1-D grid is the sequence itself
    if len(spatial_shape) not in ranks:
        raise ShapeError(
            f"{mech.name} has a grid form for {'/'.join(f'{r}-D' for r in ranks)} grids; got spatial_shape "
            f"{spatial_shape} ({len(spatial_shape)}-D). Pass a grid of those ranks, or no spatial_shape (1-D form)"
        )
    if pattern not in mech.grid_patterns:
        supported = ", ".join(sorted(p.value for p in mech.grid_patterns))
        raise UnsupportedPattern(
            f"{mech.name}'s grid form (spatial_shape={spatial_shape}) does not support pattern {pattern.value}; "
            f"it supports: {supported}. Without spatial_shape, {mech.name} runs its 1-D form over the raster order"
        )


def _check_spatial(mech: MechanismLike, spatial_shape, tq: int) -> tuple[int, ...] | None:
    if spatial_shape is None:
        if mech.spatial:
            raise ShapeError(f"{mech.name} needs spatial_shape=(h, w) or (d, h, w) with prod == T={tq}")
        return None
    shape = tuple(int(s) for s in spatial_shape)
    if not shape or any(s <= 0 for s in shape) or math.prod(shape) != tq:
        raise ShapeError(f"spatial_shape {shape} must be positive sizes whose product is T={tq}")
    return shape
