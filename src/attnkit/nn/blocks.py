"""Pieces the backbones share: the pre-LN residual block, its MLP, a short causal convolution, positions.

A block is ``x + attn(conv(LN(x)))``, then ``+ cross(LN(x), memory)`` in a decoder, then ``+ MLP(LN(x))``
(pre-LN, as GPT-2 and nanoGPT: the residual stream is never normalised, so deep stacks train without
warm-up tricks). The attention is :class:`attnkit.Attention` around any registered mechanism.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..api import info
from ..errors import InvalidOption, ShapeError, UnsupportedPattern
from ..patterns import Pattern, as_pattern
from ..state import State
from .attention import Attention

POSITIONS = ("learned", "rope", "none")  # learned absolute embeddings, rotary in attention, or none


def require_patterns(backbone: str, mechanism: str, patterns: list[Pattern | str]) -> None:
    """Raise ``UnsupportedPattern`` naming backbone, mechanism and pattern when the mechanism lacks one.

    Checked before any layer is built, so a benchmark can record "not applicable" cheaply.
    """
    have = info(mechanism).patterns  # raises UnknownMechanism (with suggestions) for a wrong name
    for p in map(as_pattern, patterns):
        if p not in have:
            supported = ", ".join(sorted(x.value for x in have))
            raise UnsupportedPattern(
                f"{backbone} needs pattern {p.value} but mechanism {mechanism!r} does not support it;"
                f" it supports: {supported}"
            )


def require_sequence(backbone: str, mechanism: str) -> None:
    """Raise ``InvalidOption`` when a sequence backbone is given a spatial mechanism (it needs a grid)."""
    if info(mechanism).spatial:
        raise InvalidOption(
            f"{backbone} feeds token sequences, but mechanism {mechanism!r} is spatial and needs a grid"
            " (spatial_shape); use attnkit.nn.ViT or attnkit.nn.HierarchicalViT"
        )


def layer_options(mechanism: str, options: dict[str, Any], index: int, depth: int) -> dict[str, Any]:
    """The mechanism's options for block ``index`` of ``depth``: a mechanism whose options include ``layer``
    and ``layers`` (Lightning Attention's decay grows with depth) gets its place in the stack unless given."""
    names = {f.name for f in dataclasses.fields(info(mechanism).options)}
    out = dict(options)
    if {"layer", "layers"} <= names and "layer" not in out and "layers" not in out:
        out.update(layer=index, layers=depth)
    return out


def check_positions(positions: str, max_positions: int | None) -> None:
    if positions not in POSITIONS:
        raise InvalidOption(f"positions={positions!r}; expected one of {', '.join(POSITIONS)}")
    if positions == "learned" and (not isinstance(max_positions, int) or max_positions < 1):
        raise InvalidOption(
            f"positions='learned' needs max_positions >= 1 (the longest sequence); got {max_positions!r}"
        )


def learned_positions(x: torch.Tensor, table: nn.Embedding, offset: int) -> torch.Tensor:
    """``x [B, T, C]`` plus the embeddings of positions ``offset .. offset + T - 1``."""
    end = offset + x.shape[1]
    if end > table.num_embeddings:
        raise InvalidOption(f"position {end - 1} is past max_positions={table.num_embeddings}; build the model longer")
    return x + table(torch.arange(offset, end, device=x.device))  # [T, C] broadcast over B


class MLP(nn.Module):
    """``Linear(dim, ratio·dim) -> GELU -> Linear(ratio·dim, dim)``: the per-token channel mixer."""

    def __init__(self, dim: int, ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        hidden = max(1, int(dim * ratio))
        self.fc, self.proj, self.drop = nn.Linear(dim, hidden), nn.Linear(hidden, dim), nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))


class ShortConv(nn.Module):
    """Causal depthwise convolution over tokens, kernel ``k`` (Zoology's BaseConv / Based use k = 3): gives
    attention a cheap view of the previous few tokens. Its state is the last ``k - 1`` inputs ``[B, k-1, C]``
    (zeros before the first token, the same left padding a full call sees), so chunks equal one call."""

    def __init__(self, dim: int, kernel: int):
        super().__init__()
        if not isinstance(kernel, int) or kernel < 1:
            raise InvalidOption(f"conv_kernel must be a positive int; got {kernel!r}")
        self.kernel = kernel
        self.conv = nn.Conv1d(dim, dim, kernel, groups=dim)

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [B, T, C]`` -> ``(y [B, T, C], new state [B, k-1, C])``."""
        if state is None:
            state = x.new_zeros(x.shape[0], self.kernel - 1, x.shape[2])
        seq = torch.cat([state, x], dim=1)  # [B, k-1+T, C]
        y = self.conv(seq.transpose(1, 2)).transpose(1, 2)  # [B, T, C]
        return y, seq[:, seq.shape[1] - (self.kernel - 1) :]


@dataclass(frozen=True)
class BlockState:
    """One block's decoding state: its attention's state, its conv's last inputs, and (decoder) the inputs
    of its cross attention so far, which ``causal_cross`` needs whole (DESIGN §1.2: query i's output is
    defined from queries 0..i, and e.g. cosFormer numbers the queries by their index in the call)."""

    attn: State | None = None
    conv: torch.Tensor | None = None
    cross_queries: torch.Tensor | None = None


@dataclass(frozen=True)
class ModelState:
    """A backbone's decoding state: tokens consumed so far (for learned positions) and one state per block."""

    offset: int
    blocks: tuple[BlockState, ...]


class Block(nn.Module):
    """Pre-LN residual block: self attention (after an optional short conv), optional cross attention, MLP.

    ``pattern`` is the self attention's; ``cross_pattern`` (None: no cross attention) is the cross
    attention's in a full call, while a call with state uses ``causal_cross`` (queries arrive one by one).
    ``mlp_ratio=0`` drops the MLP (Zoology's MQAR models have none).
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        *,
        mechanism: str,
        pattern: Pattern | str,
        cross_pattern: Pattern | str | None = None,
        rope: bool = False,
        conv_kernel: int | None = None,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        options: dict[str, Any] | None = None,
    ):
        super().__init__()
        options = options or {}
        self.norm1 = nn.LayerNorm(dim)
        self.conv = ShortConv(dim, conv_kernel) if conv_kernel else None
        self.attn = Attention(dim, heads, mechanism=mechanism, pattern=pattern, rope=rope, **options)
        self.cross = None
        if cross_pattern is not None:
            self.norm_cross = nn.LayerNorm(dim)
            self.cross = Attention(dim, heads, mechanism=mechanism, pattern=cross_pattern, **options)
        self.mlp = None
        if mlp_ratio:
            self.norm2, self.mlp = nn.LayerNorm(dim), MLP(dim, mlp_ratio, dropout)
        self.drop = nn.Dropout(dropout)

    def forward(
        self,
        x: torch.Tensor,
        *,
        key_padding_mask: torch.Tensor | None = None,
        memory: torch.Tensor | None = None,
        memory_padding_mask: torch.Tensor | None = None,
        state: BlockState | None = None,
        return_state: bool = False,
        spatial_shape: tuple[int, ...] | None = None,
    ):
        """``x [B, T, C]`` (``memory [B, S, C]`` for cross attention) -> ``x [B, T, C]`` (and the new state).

        ``spatial_shape`` (tokens on a row-major grid) reaches the self attention's mechanism; cross attention's
        keys are another sequence, so it gets none."""
        stateful = state is not None or return_state
        state = state or BlockState()
        h, conv_state = self.norm1(x), None
        if self.conv is not None:
            h, conv_state = self.conv(h, state.conv)
        if stateful:
            h, attn_state = self.attn(
                h, key_padding_mask=key_padding_mask, state=state.attn, return_state=True, spatial_shape=spatial_shape
            )
        else:
            h, attn_state = self.attn(h, key_padding_mask=key_padding_mask, spatial_shape=spatial_shape), None
        x = x + self.drop(h)
        queries = None
        if self.cross is not None:
            if memory is None:
                raise InvalidOption("this block has cross attention; pass memory= (the encoder output)")
            q = self.norm_cross(x)  # [B, T, C]
            if stateful:  # causal_cross over every query so far; keep the outputs of the new ones
                queries = q if state.cross_queries is None else torch.cat([state.cross_queries, q], dim=1)
                out = self.cross(queries, memory, key_padding_mask=memory_padding_mask, pattern=Pattern.CAUSAL_CROSS)
                out = out[:, queries.shape[1] - q.shape[1] :]
            else:
                out = self.cross(q, memory, key_padding_mask=memory_padding_mask)
            x = x + self.drop(out)
        if self.mlp is not None:
            x = x + self.mlp(self.norm2(x))
        if not return_state:
            return x
        return x, BlockState(attn=attn_state, conv=conv_state, cross_queries=queries)


def block_stack(depth: int, dim: int, heads: int, *, mechanism: str, options: dict[str, Any] | None, positions: str,
                **block: Any) -> nn.ModuleList:  # fmt: skip
    """``depth`` :class:`Block` s; block i gets its own options (``layer_options``) and rotary positions when
    ``positions == "rope"``; ``block`` holds the rest of Block's arguments (pattern, mlp_ratio ...)."""
    return nn.ModuleList(
        Block(
            dim,
            heads,
            mechanism=mechanism,
            rope=positions == "rope",
            options=layer_options(mechanism, options or {}, i, depth),
            **block,
        )  # fmt: skip
        for i in range(depth)
    )


class InputEmbedding(nn.Module):
    """Token ids ``[B, T]`` through an embedding (``vocab``) or real values ``[B, T, in_dim]`` through a linear
    map (``in_dim``: series, pixels), plus learned absolute positions when asked -> ``[B, T, dim]``."""

    def __init__(
        self,
        dim: int,
        *,
        vocab: int | None,
        in_dim: int | None,
        positions: str,
        max_positions: int | None,
        embed_std: float = 0.02,
    ):
        super().__init__()
        if not (isinstance(embed_std, (int, float)) and 0 < embed_std < math.inf):
            raise InvalidOption(f"embed_std must be a positive finite number; got {embed_std!r}")
        if (vocab is None) == (in_dim is None):
            raise InvalidOption(
                f"give exactly one of vocab= (token ids) and in_dim= (real values); got {vocab=}, {in_dim=}"
            )
        check_positions(positions, max_positions)
        self.vocab, self.in_dim = vocab, in_dim
        self.embed = nn.Embedding(vocab, dim) if vocab is not None else nn.Linear(in_dim, dim)
        if vocab is not None:
            # GPT-2's 0.02 by default; tiny models trained briefly on recall tasks want PyTorch's 1.0 (bench/quality.py)
            nn.init.normal_(self.embed.weight, std=embed_std)
        self.pos = nn.Embedding(max_positions, dim) if positions == "learned" else None
        if self.pos is not None:
            nn.init.normal_(self.pos.weight, std=0.02)

    def forward(self, x: torch.Tensor, offset: int = 0, prefix: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` -> ``[B, P + T, dim]``; ``prefix [B, P, dim]`` (a CLS token) goes first and takes positions too."""
        want = 2 if self.vocab is not None else 3
        if x.dim() != want or (want == 3 and x.shape[-1] != self.in_dim):
            shape = "[B, T] token ids" if want == 2 else f"[B, T, {self.in_dim}] values"
            raise ShapeError(f"input must be {shape}; got shape {tuple(x.shape)}")
        h = self.embed(x)  # [B, T, dim]
        if prefix is not None:
            h = torch.cat([prefix, h], dim=1)
        return h if self.pos is None else learned_positions(h, self.pos, offset)
