"""``Attention``: a full attention layer (projections, GQA, optional RoPE) around any mechanism."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..api import create
from ..errors import InvalidOption, ShapeError
from ..inputs import check_pattern
from ..ops.rope import apply_rope
from ..patterns import Pattern, as_pattern
from ..state import State


class Attention(nn.Module):
    """Multi-head attention layer: ``y = W_o · mechanism(W_q x, W_k c, W_v c)``.

    Args:
        dim: model width of ``x`` (and of the output).
        heads: the model's heads (they set ``head_dim``).
        kv_heads: key/value heads (GQA/MQA); must divide the query heads. Default: the query heads.
        head_dim: per-head width. Default: ``dim // heads``.
        query_heads: Sparse Query Attention (Filipek, 2025, arXiv:2510.01817): compute only this many
            query heads (projections and attention FLOPs x ``query_heads / heads``). Default: ``heads``.
        mechanism: registered mechanism name (``attnkit list``).
        pattern: the attention pattern; cross patterns read keys and values from ``context``.
        rope: rotary position embedding on queries and keys (self patterns only: cross attention
            has no shared positions).
        context_dim: width of ``context`` for cross patterns. Default: ``dim``.
        bias: whether the projections have a bias.
        **options: the mechanism's options.
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
        bias: bool = False,
        query_heads: int | None = None,
        **options: Any,
    ):
        super().__init__()
        self.pattern = as_pattern(pattern)
        head_dim = head_dim or dim // heads
        if query_heads is not None and not 1 <= query_heads <= heads:
            raise InvalidOption(f"query_heads={query_heads} must be between 1 and heads={heads}")
        heads = query_heads or heads  # the query heads actually computed
        kv_heads = kv_heads or heads
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
        context_dim = context_dim or dim
        self.q_proj = nn.Linear(dim, heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(context_dim, kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(context_dim, kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(heads * head_dim, dim, bias=bias)
        self.mechanism = create(mechanism, heads=heads, head_dim=head_dim, **options)
        check_pattern(self.mechanism, self.pattern)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        *,
        key_padding_mask: torch.Tensor | None = None,
        state: State | None = None,
        return_state: bool = False,
    ):
        """``x [B, T, dim]`` (and ``context [B, S, context_dim]`` for cross patterns) -> ``[B, T, dim]``.

        ``key_padding_mask [B, T or S]`` marks real tokens of whatever keys come from. With
        ``return_state=True`` returns ``(y, state)``; feed the state back to decode further tokens.
        """
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ShapeError(f"x must be [B, T, {self.dim}]; got shape {tuple(x.shape)}")
        if self.pattern.is_self and context is not None:
            raise InvalidOption(f"pattern {self.pattern.value} attends within x; pass no context")
        if not self.pattern.is_self and context is None:
            raise InvalidOption(f"pattern {self.pattern.value} needs context= (the sequence to attend to)")
        src = x if context is None else context
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim)
        k = self.k_proj(src).view(b, src.shape[1], self.kv_heads, self.head_dim)
        v = self.v_proj(src).view(b, src.shape[1], self.kv_heads, self.head_dim)
        if self.rope:
            start = state.offset if state is not None else 0
            pos = torch.arange(start, start + t, device=x.device)
            q, k = apply_rope(q, pos, self.rope_base), apply_rope(k, pos, self.rope_base)
        res = self.mechanism(
            q,
            k,
            v,
            pattern=self.pattern,
            key_padding_mask=key_padding_mask,
            state=state,
            return_state=return_state,
        )
        out, new_state = res if return_state else (res, None)
        y = self.o_proj(out.reshape(b, t, self.heads * self.head_dim))
        return (y, new_state) if return_state else y
