"""``Encoder`` (a ``noncausal_self`` stack) and ``EncoderClassifier`` (encoder + pooling + linear head).

model = attnkit.nn.EncoderClassifier(vocab=20, n_classes=10, dim=64, depth=4, heads=4, mechanism="linear")
logits = model(tokens, key_padding_mask=mask)   # [B, T] (+ [B, T] bool, True = real) -> [B, n_classes]
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import InvalidOption, ShapeError
from ..patterns import Pattern
from .blocks import InputEmbedding, block_stack, require_patterns, require_sequence

POOLING = ("cls", "mean")


class Encoder(nn.Module):
    """Input embedding, ``depth`` pre-LN blocks with ``noncausal_self`` attention, final LN.

    Takes token ids (``vocab``) or real values (``in_dim``); ``positions`` is ``"learned"`` (up to
    ``max_positions``), ``"rope"`` or ``"none"``; ``embed_std`` is the token embedding's initial standard
    deviation (as in :class:`attnkit.nn.CausalLM`). ``backbone`` names the model in error messages.
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        heads: int,
        *,
        mechanism: str,
        vocab: int | None = None,
        in_dim: int | None = None,
        positions: str = "learned",
        max_positions: int | None = 2048,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        embed_std: float = 0.02,
        options: dict[str, Any] | None = None,
        backbone: str = "Encoder",
    ):
        super().__init__()
        require_patterns(backbone, mechanism, [Pattern.NONCAUSAL_SELF])
        require_sequence(backbone, mechanism)
        self.inputs = InputEmbedding(
            dim, vocab=vocab, in_dim=in_dim, positions=positions, max_positions=max_positions, embed_std=embed_std
        )
        self.drop = nn.Dropout(dropout)
        self.blocks = block_stack(
            depth,
            dim,
            heads,
            mechanism=mechanism,
            options=options,
            positions=positions,
            pattern=Pattern.NONCAUSAL_SELF,
            mlp_ratio=mlp_ratio,
            dropout=dropout,
        )
        self.norm = nn.LayerNorm(dim)

    def forward(
        self, x: torch.Tensor, *, key_padding_mask: torch.Tensor | None = None, prefix: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``x [B, T]`` ids or ``[B, T, in_dim]`` values -> ``[B, P + T, dim]`` (``prefix [B, P, dim]`` first).

        ``key_padding_mask [B, P + T]`` (True = real token): padded tokens are no key of any query, so the
        outputs at real tokens do not depend on them (every other part of a block is per token).
        """
        h = self.drop(self.inputs(x, prefix=prefix))
        if key_padding_mask is not None and key_padding_mask.shape != h.shape[:2]:
            raise ShapeError(
                f"key_padding_mask must be [B, T] = {tuple(h.shape[:2])}; got {tuple(key_padding_mask.shape)}"
            )
        for block in self.blocks:
            h = block(h, key_padding_mask=key_padding_mask)
        return self.norm(h)


class EncoderClassifier(nn.Module):
    """Sequence classifier: an :class:`Encoder`, pooled, then ``Linear(dim, n_classes)``.

    Args:
        n_classes: number of classes (the logits' width).
        vocab / in_dim: token ids ``[B, T]`` or real values ``[B, T, in_dim]`` (exactly one).
        dim, depth, heads: model width, blocks, attention heads.
        mechanism: registered mechanism name; it must support ``noncausal_self`` (else ``UnsupportedPattern``).
        pooling: ``"cls"`` (a learned token prepended to every sequence; its output is the summary, as
            BERT and ViT) or ``"mean"`` (the average over real tokens, as LRA's ListOps baselines).
        positions, max_positions, mlp_ratio, dropout, embed_std: as in :class:`Encoder` (learned positions count the
            CLS token, so they need ``max_positions >= T + 1`` with CLS pooling).
        **options: the mechanism's options.
    """

    def __init__(
        self,
        n_classes: int,
        *,
        vocab: int | None = None,
        in_dim: int | None = None,
        dim: int = 64,
        depth: int = 2,
        heads: int = 4,
        mechanism: str = "softmax",
        pooling: str = "cls",
        positions: str = "learned",
        max_positions: int | None = 2048,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        embed_std: float = 0.02,
        **options: Any,
    ):
        super().__init__()
        if pooling not in POOLING:
            raise InvalidOption(f"pooling={pooling!r}; expected one of {', '.join(POOLING)}")
        self.pooling = pooling
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
            backbone="EncoderClassifier",
        )
        self.cls = nn.Parameter(0.02 * torch.randn(1, 1, dim)) if pooling == "cls" else None
        self.head = nn.Linear(dim, n_classes)

    def forward(self, x: torch.Tensor, *, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x [B, T]`` ids or ``[B, T, in_dim]`` values (mask ``[B, T]``, True = real) -> logits ``[B, n_classes]``.

        Padded tokens change nothing: no query attends to them and mean pooling skips them.
        """
        b, t = x.shape[:2]
        mask = key_padding_mask
        if mask is not None and (mask.dtype != torch.bool or mask.shape != (b, t)):
            raise ShapeError(f"key_padding_mask must be bool [B, T] = {(b, t)}; got {mask.dtype} {tuple(mask.shape)}")
        if self.cls is None:
            h = self.encoder(x, key_padding_mask=mask)  # [B, T, dim]
            if mask is None:
                pooled = h.mean(dim=1)
            else:
                real = mask[..., None].to(h.dtype)  # [B, T, 1]
                pooled = (h * real).sum(dim=1) / real.sum(dim=1).clamp_min(1.0)  # all-padded row: zeros
        else:
            if mask is not None:
                mask = torch.cat([mask.new_ones(b, 1), mask], dim=1)  # the CLS token is real
            h = self.encoder(x, key_padding_mask=mask, prefix=self.cls.expand(b, -1, -1))  # [B, 1 + T, dim]
            pooled = h[:, 0]
        return self.head(pooled)  # [B, n_classes]
