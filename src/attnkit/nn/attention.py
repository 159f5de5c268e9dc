"""``Attention``: a full attention layer (projections, GQA, optional RoPE) around any mechanism."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import torch
import torch.distributed
from torch import nn

from ..api import create
from ..errors import DTypeError, InvalidOption, ShapeError
from ..inputs import check_pattern
from ..mechanism import REGISTRY
from ..ops.rope import apply_rope
from ..options import MAX_HEAD_DIM, MAX_HEADS, MAX_WIDTH, check_size
from ..patterns import Pattern, as_pattern
from ..state import State


class Attention(nn.Module):
    """Multi-head attention layer: ``y = W_o · mechanism(W_q x, W_k c, W_v c)``.

    Args:
        dim: model width of ``x`` (and of the output).
        heads: the model's heads (they set ``head_dim``).
        kv_heads: key/value heads (GQA/MQA); must divide the query heads. Default: the query heads.
        head_dim: per-head width. Default: ``dim // heads``.
        sparse_query_heads: Sparse Query Attention (Filipek, 2025, arXiv:2510.01817) in the layer: compute
            only this many query heads (projections and attention FLOPs x ``sparse_query_heads / heads``).
            Default: ``heads``. (The ``sqa`` mechanism's ``query_heads`` option does it inside attention.)
        mechanism: registered mechanism name (``attnkit list``).
        pattern: the attention pattern; cross patterns read keys and values from ``context``.
        rope: rotary position embedding on queries and keys (self patterns only: cross attention
            has no shared positions).
        context_dim: width of ``context`` for cross patterns. Default: ``dim``.
        proj_bias: whether the projections have a bias.
        context_parallel: split the sequence over the ranks of a ``torch.distributed`` group: ``True`` (the
            default group) or a ``ProcessGroup``. Each rank then passes its shard of ``x`` in ``cp_layout``
            (``attnkit.distributed.shard``) and gets its shard of the output; the mechanism runs through
            ``attnkit.distributed.attend`` with ``cp_strategy``, and RoPE uses the global positions. Weight gradients
            are each rank's share: all-reduce them (DDP does). No decoding state.
        **options: the mechanism's options. None is named like an argument above (a registered mechanism
            whose option is gets refused as ambiguous when that argument is given).
    """

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        *,
        kv_heads: int | None = None,
        head_dim: int | None = None,
        mechanism: str = "softmax",
        pattern: Pattern | str = Pattern.CAUSAL_SELF,
        rope: bool = False,
        rope_base: float = 10000.0,
        context_dim: int | None = None,
        proj_bias: bool = False,
        sparse_query_heads: int | None = None,
        context_parallel: Any = None,
        cp_layout: str = "zigzag",
        cp_strategy: str = "auto",
        **options: Any,
    ):
        super().__init__()
        given = {name: value for name, value in locals().items() if name in _DEFAULTS}
        _refuse_ambiguous(mechanism, given)
        self.pattern = as_pattern(pattern)
        check_size("Attention: dim", dim, MAX_WIDTH)
        check_size("Attention: heads", heads, MAX_HEADS)
        for label, value, top in (
            ("kv_heads", kv_heads, MAX_HEADS),
            ("head_dim", head_dim, MAX_HEAD_DIM),
            ("context_dim", context_dim, MAX_WIDTH),
        ):
            if value is not None:
                check_size(f"Attention: {label}", value, top)
        if sparse_query_heads is not None and (
            isinstance(sparse_query_heads, bool)
            or not isinstance(sparse_query_heads, int)
            or not 1 <= sparse_query_heads <= heads
        ):
            raise InvalidOption(f"sparse_query_heads={sparse_query_heads!r} must be between 1 and heads={heads}")
        head_dim = dim // heads if head_dim is None else head_dim
        heads = sparse_query_heads or heads  # the query heads actually computed
        kv_heads = heads if kv_heads is None else kv_heads
        if heads % kv_heads:
            raise InvalidOption(f"query heads ({heads}) must be a multiple of kv_heads={kv_heads}")
        if head_dim < 1:
            raise InvalidOption(f"dim={dim} with heads={heads} leaves no head dim; pass head_dim")
        if rope and not self.pattern.is_self:
            raise InvalidOption(f"rope=True needs a self pattern; {self.pattern.value} has no shared positions")
        if rope and head_dim % 2:
            raise InvalidOption(f"rope=True needs an even head_dim; got {head_dim}")
        self.dim, self.heads, self.kv_heads, self.head_dim = dim, heads, kv_heads, head_dim
        self.rope, self.rope_base = rope, rope_base
        self.context_dim = context_dim = context_dim or dim
        self.q_proj = nn.Linear(dim, heads * head_dim, bias=proj_bias)
        self.k_proj = nn.Linear(context_dim, kv_heads * head_dim, bias=proj_bias)
        self.v_proj = nn.Linear(context_dim, kv_heads * head_dim, bias=proj_bias)
        self.o_proj = nn.Linear(heads * head_dim, dim, bias=proj_bias)
        self.mechanism = create(mechanism, heads=heads, head_dim=head_dim, **options)
        check_pattern(self.mechanism, self.pattern)
        self.context_parallel, self.cp_layout, self.cp_strategy = _check_cp(context_parallel, cp_layout, cp_strategy,
                                                                            self.pattern)  # fmt: skip

    def _check_input(self, label: str, t: object, width: int, batch: int | None = None) -> None:
        """``t`` must be a ``[B, T, width]`` tensor with the projections' dtype and device (and x's batch)."""
        w = self.q_proj.weight
        if not isinstance(t, torch.Tensor):
            raise DTypeError(f"{label} must be a torch.Tensor [B, T, {width}]; got {type(t).__name__}")
        if t.dim() != 3 or t.shape[-1] != width:
            layout = "[B, T, " if label == "x" else "[B, S, "
            raise ShapeError(f"{label} must be {layout}{width}]; got shape {tuple(t.shape)}")
        if batch is not None and t.shape[0] != batch:
            raise ShapeError(f"{label} has batch size {t.shape[0]} but x has {batch}")
        if t.dtype != w.dtype or t.device != w.device:
            raise DTypeError(
                f"{label} is {t.dtype} on {t.device} but the layer's parameters are {w.dtype} on {w.device};"
                " cast one to the other (layer.to(...) or x.to(...))"
            )

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        *,
        key_padding_mask: torch.Tensor | None = None,
        state: State | None = None,
        return_state: bool = False,
        pattern: Pattern | str | None = None,
        spatial_shape: tuple[int, ...] | None = None,
    ):
        """``x [B, T, dim]`` (and ``context [B, S, context_dim]`` for cross patterns) -> ``[B, T, dim]``.

        ``key_padding_mask [B, T or S]`` marks real tokens of whatever keys come from. With
        ``return_state=True`` returns ``(y, state)``; feed the state back to decode further tokens.
        ``pattern`` overrides the layer's pattern for this call, with the same weights: it must be a self
        pattern for a self layer and a cross one for a cross layer (a decoder's cross attention trained
        with ``noncausal_cross`` decodes with ``causal_cross``). ``spatial_shape`` (``(h, w)`` or ``(d, h, w)``,
        tokens flattened row-major) goes to the mechanism as it is; the mechanism checks it (DESIGN §1.1).
        """
        self._check_input("x", x, self.dim)
        pattern = self.pattern if pattern is None else as_pattern(pattern)
        if pattern.is_self != self.pattern.is_self:
            kind = "self" if self.pattern.is_self else "cross"
            raise InvalidOption(f"pattern={pattern.value} cannot override the {kind} pattern {self.pattern.value}")
        if pattern.is_self and context is not None:
            raise InvalidOption(f"pattern {pattern.value} attends within x; pass no context")
        if not pattern.is_self and context is None:
            raise InvalidOption(f"pattern {pattern.value} needs context= (the sequence to attend to)")
        if context is not None:
            self._check_input("context", context, self.context_dim, batch=x.shape[0])
        src = x if context is None else context
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim)
        k = self.k_proj(src).view(b, src.shape[1], self.kv_heads, self.head_dim)
        v = self.v_proj(src).view(b, src.shape[1], self.kv_heads, self.head_dim)
        if self.context_parallel is not None:
            return self._context_parallel(q, k, v, pattern, key_padding_mask, state, return_state, spatial_shape)
        if self.rope:
            start = state.offset if state is not None else 0
            pos = torch.arange(start, start + t, device=x.device)
            q, k = apply_rope(q, pos, self.rope_base), apply_rope(k, pos, self.rope_base)
        res = self.mechanism(
            q,
            k,
            v,
            pattern=pattern,
            key_padding_mask=key_padding_mask,
            state=state,
            return_state=return_state,
            spatial_shape=spatial_shape,
        )
        out, new_state = res if return_state else (res, None)
        y = self.o_proj(out.reshape(b, t, self.heads * self.head_dim))
        return (y, new_state) if return_state else y

    def _context_parallel(self, q, k, v, pattern, key_padding_mask, state, return_state, spatial_shape):
        """This rank's shard through ``attnkit.distributed.attend`` (q, k, v: ``[B, n, H, D]`` of the local tokens)."""
        from .. import distributed

        if state is not None or return_state:
            raise InvalidOption(
                "a layer with context_parallel has no decoding state: pass no state, return_state=False"
            )
        if spatial_shape is not None:
            raise InvalidOption("a layer with context_parallel splits a 1-D sequence; spatial_shape is not taken")
        group = None if self.context_parallel is True else self.context_parallel
        b, n = q.shape[:2]
        if self.rope:  # the global positions of this rank's tokens
            world = torch.distributed.get_world_size(group) if torch.distributed.is_initialized() else 1
            rank = torch.distributed.get_rank(group) if torch.distributed.is_initialized() else 0
            distributed.layout.check_length(n * world, world, self.cp_layout)
            pos = distributed.positions(n * world, world, rank, self.cp_layout).to(q.device)
            q, k = apply_rope(q, pos, self.rope_base), apply_rope(k, pos, self.rope_base)
        out = distributed.attend(q, k, v, self.mechanism, pattern=pattern, group=group, strategy=self.cp_strategy,
                                 layout=self.cp_layout, key_padding_mask=key_padding_mask)  # fmt: skip
        return self.o_proj(out.reshape(b, n, self.heads * self.head_dim))


# the layer's own arguments and their defaults (what a mechanism option must not be named)
_DEFAULTS = {
    p.name: p.default
    for p in inspect.signature(Attention.__init__).parameters.values()
    if p.name != "self" and p.kind is not p.VAR_KEYWORD
}


def _check_cp(group: Any, layout: str, strategy: str, pattern: Pattern):
    """``context_parallel``: None/False (off), True (the default group) or a ProcessGroup."""
    if group is None or group is False:
        return None, layout, strategy
    if group is not True and not isinstance(group, torch.distributed.ProcessGroup):
        raise InvalidOption(
            f"context_parallel={group!r} is not valid; expected None, True (the default group) or a ProcessGroup"
        )
    if not pattern.is_self:
        raise InvalidOption(
            f"context_parallel needs a self pattern (one sequence split over ranks); got {pattern.value}"
        )
    from ..distributed.layout import check_layout

    return group, check_layout(layout), strategy


def _refuse_ambiguous(mechanism: object, given: dict[str, Any]) -> None:
    """A layer argument given a value while the mechanism has an option of the same name: which is meant
    cannot be told, so say so rather than keep it for the layer and leave the mechanism at its default."""
    if not isinstance(mechanism, str) or mechanism not in REGISTRY:
        return  # create() reports it
    options = {f.name for f in dataclasses.fields(REGISTRY.get(mechanism).Options)}
    for name in sorted(options & set(_DEFAULTS)):
        if given[name] != _DEFAULTS[name]:
            raise InvalidOption(
                f"Attention argument {name}={given[name]!r} is ambiguous: mechanism {mechanism!r} has an option"
                f" {name!r} too, and the layer cannot tell which is meant. Rename the mechanism's option."
            )
