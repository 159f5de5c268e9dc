"""``CausalLM``: a decoder-only language model whose attention is any registered mechanism.

model = attnkit.nn.CausalLM(vocab=128, dim=64, depth=2, heads=4, mechanism="linear")
logits = model(tokens)                                   # [B, T] -> [B, T, vocab]
logits, state = model(tokens[:, :5], return_state=True)  # then feed the rest in chunks with state=state
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import InvalidOption
from ..patterns import Pattern
from .blocks import InputEmbedding, ModelState, block_stack, require_patterns, require_sequence


class CausalLM(nn.Module):
    """Token embedding, ``depth`` pre-LN blocks with ``causal_self`` attention, final LN, linear head.

    Args:
        vocab: number of token ids.
        dim, depth, heads: model width, blocks, attention heads.
        mechanism: registered mechanism name; it must support ``causal_self`` (else ``UnsupportedPattern``).
        kv_heads: key/value heads (GQA); default ``heads``.
        positions: ``"learned"`` (absolute embeddings, up to ``max_positions`` tokens), ``"rope"`` (rotary,
            in each attention) or ``"none"`` (the causal mask and the conv still tell order apart).
        max_positions: the longest sequence, for learned positions.
        conv_kernel: a short causal depthwise convolution before attention in each block (Zoology and Based
            use 3: it lets attention see the previous tokens directly); None for none.
        mlp_ratio: MLP width / dim; 0 for no MLP (Zoology's MQAR models).
        tie_weights: the output head reuses the token embedding (fewer parameters, as GPT-2).
        dropout: on embeddings and residual branches; 0 by default (tiny models on synthetic tasks).
        embed_std: the token embedding's initial standard deviation (GPT-2's 0.02; the quality benchmark's
            tiny untied models use 1.0, with which softmax learns MQAR in a few hundred steps).
        **options: the mechanism's options.
    """

    def __init__(
        self,
        vocab: int,
        dim: int = 64,
        depth: int = 2,
        heads: int = 4,
        *,
        mechanism: str = "softmax",
        kv_heads: int | None = None,
        positions: str = "learned",
        max_positions: int | None = 2048,
        conv_kernel: int | None = None,
        mlp_ratio: float = 4.0,
        tie_weights: bool = True,
        dropout: float = 0.0,
        embed_std: float = 0.02,
        **options: Any,
    ):
        super().__init__()
        require_patterns("CausalLM", mechanism, [Pattern.CAUSAL_SELF])
        require_sequence("CausalLM", mechanism)
        if kv_heads is not None:
            options["kv_heads"] = kv_heads
        self.vocab, self.dim, self.positions = vocab, dim, positions
        self.inputs = InputEmbedding(
            dim, vocab=vocab, in_dim=None, positions=positions, max_positions=max_positions, embed_std=embed_std
        )
        self.drop = nn.Dropout(dropout)
        self.blocks = block_stack(
            depth,
            dim,
            heads,
            mechanism=mechanism,
            options=options,
            positions=positions,
            pattern=Pattern.CAUSAL_SELF,
            conv_kernel=conv_kernel,
            mlp_ratio=mlp_ratio,
            dropout=dropout,
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        if tie_weights:
            self.head.weight = self.inputs.embed.weight  # one [vocab, dim] parameter

    def forward(self, tokens: torch.Tensor, *, state: ModelState | None = None, return_state: bool = False):
        """``tokens [B, T]`` (int) -> ``logits [B, T, vocab]``; logit t depends on tokens 0..t only.

        With ``return_state=True`` returns ``(logits, state)``: pass the state with the next chunk (any
        size, 1 for a decoding step) and the concatenated logits equal one call on the whole sequence.
        """
        stateful = state is not None or return_state
        if state is not None and len(state.blocks) != len(self.blocks):
            raise InvalidOption(f"state has {len(state.blocks)} blocks but the model has {len(self.blocks)}")
        offset = state.offset if state is not None else 0
        x = self.drop(self.inputs(tokens, offset=offset))  # [B, T, dim]
        new_states = []
        for i, block in enumerate(self.blocks):
            if stateful:
                x, s = block(x, state=state.blocks[i] if state else None, return_state=True)
                new_states.append(s)
            else:
                x = block(x)
        logits = self.head(self.norm(x))  # [B, T, vocab]
        if not return_state:
            return logits
        return logits, ModelState(offset=offset + tokens.shape[1], blocks=tuple(new_states))
