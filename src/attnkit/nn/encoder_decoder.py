"""``EncoderDecoder``: an encoder (``noncausal_self``) and a decoder (``causal_self`` + cross attention).

model = attnkit.nn.EncoderDecoder(in_dim=1, out_dim=1, dim=64, depth=2, heads=4, mechanism="linear")
pred = model(history, targets_so_far)          # forecasting: [B, S, 1], [B, T, 1] -> [B, T, 1]
memory = model.encode(history)                 # decoding: encode once, then step with state
y, state = model.decode(first, memory, return_state=True)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import InvalidOption, ShapeError
from ..patterns import Pattern, as_pattern
from .blocks import InputEmbedding, ModelState, block_stack, require_patterns, require_sequence
from .encoder import Encoder


class EncoderDecoder(nn.Module):
    """Encoder-decoder Transformer whose attention is one registered mechanism in every pattern it needs.

    Args:
        out_dim: width of the output head: the vocabulary for token logits, or the number of values to
            predict per step (forecasting). Default: ``vocab``, else ``in_dim``.
        vocab / in_dim: inputs (source and target alike) are token ids ``[B, T]`` or values ``[B, T, in_dim]``.
        dim, depth, heads: model width, encoder blocks, attention heads; ``decoder_depth`` defaults to ``depth``.
        mechanism: registered mechanism name. It must support ``noncausal_self`` (encoder), ``causal_self``
            (decoder), ``causal_cross`` (decoding) and ``cross_pattern``, else ``UnsupportedPattern``.
        cross_pattern: the cross attention's pattern in a full (teacher-forced) call. ``"causal_cross"``
            (default): decoder position i's output never depends on later decoder positions, so decoding
            token by token reproduces it exactly for every mechanism. ``"noncausal_cross"``: the queries may
            share information (RALA pools them, for instance), which suits a decoder that predicts all steps
            at once from known inputs; for mechanisms whose outputs are per query (softmax, linear, ...) the
            two are the same. Calls with state always use ``causal_cross``.
        positions, max_positions, mlp_ratio, dropout, embed_std: as in :class:`attnkit.nn.CausalLM`.
        **options: the mechanism's options (the same in every attention).
    """

    def __init__(
        self,
        out_dim: int | None = None,
        *,
        vocab: int | None = None,
        in_dim: int | None = None,
        dim: int = 64,
        depth: int = 2,
        decoder_depth: int | None = None,
        heads: int = 4,
        mechanism: str = "softmax",
        cross_pattern: Pattern | str = Pattern.CAUSAL_CROSS,
        positions: str = "learned",
        max_positions: int | None = 2048,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        embed_std: float = 0.02,
        **options: Any,
    ):
        super().__init__()
        cross_pattern = as_pattern(cross_pattern)
        if cross_pattern.is_self:
            raise InvalidOption(f"cross_pattern must be noncausal_cross or causal_cross; got {cross_pattern.value}")
        needed = [Pattern.NONCAUSAL_SELF, Pattern.CAUSAL_SELF, cross_pattern, Pattern.CAUSAL_CROSS]
        require_patterns("EncoderDecoder", mechanism, needed)
        require_sequence("EncoderDecoder", mechanism)
        out_dim = out_dim or vocab or in_dim
        decoder_depth = depth if decoder_depth is None else decoder_depth
        self.encoder = Encoder(
            dim,
            depth,
            heads,
            mechanism=mechanism,
            vocab=vocab,
            in_dim=in_dim,
            positions=positions,
            max_positions=max_positions,
            mlp_ratio=mlp_ratio,
            dropout=dropout,
            embed_std=embed_std,
            options=options,
            backbone="EncoderDecoder",
        )
        self.inputs = InputEmbedding(
            dim, vocab=vocab, in_dim=in_dim, positions=positions, max_positions=max_positions, embed_std=embed_std
        )
        self.drop = nn.Dropout(dropout)
        self.blocks = block_stack(
            decoder_depth,
            dim,
            heads,
            mechanism=mechanism,
            options=options,
            positions=positions,
            pattern=Pattern.CAUSAL_SELF,
            cross_pattern=cross_pattern,
            mlp_ratio=mlp_ratio,
            dropout=dropout,
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, out_dim)

    def encode(self, src: torch.Tensor, *, src_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``src [B, S]`` ids or ``[B, S, in_dim]`` values -> ``memory [B, S, dim]`` (mask: True = real)."""
        return self.encoder(src, key_padding_mask=src_padding_mask)

    def decode(
        self,
        tgt: torch.Tensor,
        memory: torch.Tensor,
        *,
        memory_padding_mask: torch.Tensor | None = None,
        state: ModelState | None = None,
        return_state: bool = False,
    ):
        """``tgt [B, T]`` ids or ``[B, T, in_dim]`` values, ``memory [B, S, dim]`` -> ``[B, T, out_dim]``.

        Output t depends on ``tgt[:, :t+1]`` and the whole memory. With ``return_state=True`` returns
        ``(out, state)``; feeding the target in chunks (1 for a decoding step) with the state equals one
        call. Each layer's self attention keeps its own state; its cross attention runs ``causal_cross``
        on all queries so far (kept in the state) and keeps the new ones' outputs.
        """
        if memory.dim() != 3 or memory.shape[0] != tgt.shape[0]:
            raise ShapeError(f"memory must be [B, S, dim] with tgt's batch {tgt.shape[0]}; got {tuple(memory.shape)}")
        stateful = state is not None or return_state
        if state is not None and len(state.blocks) != len(self.blocks):
            raise InvalidOption(f"state has {len(state.blocks)} blocks but the decoder has {len(self.blocks)}")
        offset = state.offset if state is not None else 0
        x = self.drop(self.inputs(tgt, offset=offset))  # [B, T, dim]
        new_states = []
        for i, block in enumerate(self.blocks):
            kw = dict(memory=memory, memory_padding_mask=memory_padding_mask)
            if stateful:
                x, s = block(x, state=state.blocks[i] if state else None, return_state=True, **kw)
                new_states.append(s)
            else:
                x = block(x, **kw)
        out = self.head(self.norm(x))  # [B, T, out_dim]
        if not return_state:
            return out
        return out, ModelState(offset=offset + tgt.shape[1], blocks=tuple(new_states))

    def forward(
        self,
        src: torch.Tensor,
        tgt: torch.Tensor,
        *,
        src_padding_mask: torch.Tensor | None = None,
        state: ModelState | None = None,
        return_state: bool = False,
    ):
        """Teacher forcing: ``encode(src)`` then ``decode(tgt, memory)``; see :meth:`decode` for state.

        For step-by-step decoding call :meth:`encode` once and :meth:`decode` per step instead.
        """
        memory = self.encode(src, src_padding_mask=src_padding_mask)
        return self.decode(tgt, memory, memory_padding_mask=src_padding_mask, state=state, return_state=return_state)
