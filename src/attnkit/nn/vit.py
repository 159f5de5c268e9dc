"""``ViT`` and ``HierarchicalViT``: small image classifiers whose attention is any registered mechanism.

model = attnkit.nn.ViT(image_size=32, patch_size=4, in_channels=3, num_classes=10, dim=64, depth=4, heads=4,
                       mechanism="neighborhood", pooling="mean", kernel_size=3)
logits = model(images)                                   # [B, 3, 32, 32] -> [B, 10]

A ViT (Dosovitskiy et al., 2021, arXiv:2010.11929) cuts the image into ``p × p`` patches with a strided
convolution, adds a learned position embedding, runs pre-LN blocks (``nn.blocks``) and classifies a class
token or the mean of the patch tokens. The patch tokens lie on an ``(H/p, W/p)`` grid, flattened row-major;
that grid is passed as ``spatial_shape`` to every attention call whenever the tokens are exactly the grid
(mean pooling), so spatial mechanisms (``attnkit.info(name).spatial``) see it, as do mechanisms that use a
grid when given one. A class token is no cell of the grid, so a spatial mechanism needs ``pooling="mean"``.

``HierarchicalViT`` is Swin's layout (Liu et al., 2021, arXiv:2103.14030): stages of blocks at falling
resolution, joined by 2×2 patch merging (concatenate the four neighbours, LN, linear ``4C -> C'``; Swin's
``C' = 2C``), then mean pooling. Each stage passes its own grid. A grid with an odd side is zero-padded at
its bottom / right before merging, as Swin's ``PatchMerging`` does, so a ``7 × 7`` grid becomes ``4 × 4``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..api import info
from ..errors import DTypeError, InvalidOption, ShapeError
from ..options import MAX_COUNT, MAX_HEADS, MAX_WIDTH, check_size
from ..patterns import Pattern
from .blocks import block_stack, require_patterns

POOLING = ("cls", "mean")
VIT_POSITIONS = ("learned", "none")  # rotary positions number tokens along one axis: no fit for a 2-D grid


def _pair(label: str, value: int | Sequence[int]) -> tuple[int, int]:
    """An int ``n`` -> ``(n, n)``; a pair of ints stays as it is (height, width)."""
    pair = (value, value) if isinstance(value, int) and not isinstance(value, bool) else tuple(value)
    if len(pair) != 2:
        raise InvalidOption(f"{label} must be an int or (height, width); got {value!r}")
    for side in pair:
        check_size(label, side, MAX_WIDTH)
    return pair  # type: ignore[return-value]


def patch_grid(image_size: int | Sequence[int], patch_size: int | Sequence[int]) -> tuple[int, int]:
    """The grid of patches ``(H / p_h, W / p_w)``; ``ShapeError`` when a side is not a multiple of the patch."""
    (h, w), (ph, pw) = _pair("image_size", image_size), _pair("patch_size", patch_size)
    if h % ph or w % pw:
        raise ShapeError(
            f"image_size {(h, w)} is not divisible by patch_size {(ph, pw)} (remainders {(h % ph, w % pw)});"
            " choose a patch size that divides each side, or crop or pad the images"
        )
    return h // ph, w // pw


def _check_choice(label: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise InvalidOption(f"{label}={value!r}; expected one of {', '.join(choices)}")


def _per_stage(label: str, value: int | Sequence[int], stages: int) -> tuple[int, ...]:
    """One int per stage: an int is repeated; a sequence must have one entry per stage."""
    values = (value,) * stages if isinstance(value, int) and not isinstance(value, bool) else tuple(value)
    if len(values) != stages:
        raise InvalidOption(f"{label} needs one value per stage ({stages}); got {value!r}")
    return values


class PatchEmbedding(nn.Module):
    """Non-overlapping ``p × p`` patches through ``Conv2d(in_channels, dim, p, stride=p)``:
    images ``[B, C, H, W]`` -> tokens ``[B, (H/p)·(W/p), dim]``, row-major over the patch grid."""

    def __init__(self, image_size: int | Sequence[int], patch_size: int | Sequence[int], in_channels: int, dim: int):
        super().__init__()
        check_size("in_channels", in_channels, MAX_WIDTH)
        self.grid = patch_grid(image_size, patch_size)
        self.image_size, self.in_channels = _pair("image_size", image_size), in_channels
        patch = _pair("patch_size", patch_size)
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch, stride=patch)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        w = self.proj.weight
        if not isinstance(images, torch.Tensor):
            raise DTypeError(f"images must be a torch.Tensor [B, C, H, W]; got {type(images).__name__}")
        want = (self.in_channels, *self.image_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != want:
            raise ShapeError(f"images must be [B, {want[0]}, {want[1]}, {want[2]}]; got shape {tuple(images.shape)}")
        if images.dtype != w.dtype or images.device != w.device:
            raise DTypeError(
                f"images are {images.dtype} on {images.device} but the model's parameters are {w.dtype} on"
                f" {w.device}; cast one to the other (model.to(...) or images.to(...))"
            )
        return self.proj(images).flatten(2).transpose(1, 2)  # [B, dim, h, w] -> [B, h·w, dim]


class PatchMerging(nn.Module):
    """Swin's 2×2 patch merging: ``[B, h·w, C]`` on an ``(h, w)`` grid -> ``[B, ⌈h/2⌉·⌈w/2⌉, out_dim]``.

    The four neighbours of each 2×2 cell are concatenated (``4C``), normalised and mapped by a linear layer
    to ``out_dim``. An odd side is zero-padded at the bottom / right first (Swin's ``PatchMerging``)."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)

    @staticmethod
    def merged_shape(shape: tuple[int, int]) -> tuple[int, int]:
        return math.ceil(shape[0] / 2), math.ceil(shape[1] / 2)

    def forward(self, x: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
        b, _, c = x.shape
        h, w = shape
        grid = x.view(b, h, w, c)
        grid = F.pad(grid, (0, 0, 0, w % 2, 0, h % 2))  # [B, h + h%2, w + w%2, C]; zeros at bottom / right
        cells = [grid[:, 0::2, 0::2], grid[:, 1::2, 0::2], grid[:, 0::2, 1::2], grid[:, 1::2, 1::2]]
        merged = torch.cat(cells, dim=-1)  # [B, ⌈h/2⌉, ⌈w/2⌉, 4C]
        return self.reduction(self.norm(merged)).flatten(1, 2)  # [B, ⌈h/2⌉·⌈w/2⌉, out_dim]


def _check_mechanism(backbone: str, mechanism: str) -> bool:
    """The mechanism must support ``noncausal_self``; returns whether it is spatial (needs the grid)."""
    require_patterns(backbone, mechanism, [Pattern.NONCAUSAL_SELF])
    return info(mechanism).spatial


def _stage(dim: int, depth: int, heads: int, mechanism: str, mlp_ratio: float, dropout: float, options: dict):
    check_size("dim", dim, MAX_WIDTH)
    check_size("depth", depth, MAX_COUNT)
    check_size("heads", heads, MAX_HEADS)
    return block_stack(depth, dim, heads, mechanism=mechanism, options=options, positions="none",
                       pattern=Pattern.NONCAUSAL_SELF, mlp_ratio=mlp_ratio, dropout=dropout)  # fmt: skip


class ViT(nn.Module):
    """Vision Transformer: patch embedding, learned positions, pre-LN blocks, final LN, pooling, linear head.

    Args:
        image_size: ``H`` or ``(H, W)``; images must have exactly this size (the positions are learned per patch).
        patch_size: ``p`` or ``(p_h, p_w)``; it must divide the image's sides (else ``ShapeError``).
        in_channels: channels of the images (3 for RGB).
        num_classes: the logits' width.
        dim, depth, heads: model width, blocks, attention heads.
        mechanism: registered mechanism name; it must support ``noncausal_self`` (else ``UnsupportedPattern``).
        pooling: ``"cls"`` (a learned class token first, its output classifies; ViT's) or ``"mean"`` (the
            average of the patch tokens). A spatial mechanism needs ``"mean"``: the class token is no cell of
            the grid (``InvalidOption`` otherwise).
        mlp_ratio, dropout: as in the other backbones.
        positions: ``"learned"`` (one embedding per token, class token included) or ``"none"``.
        **options: the mechanism's options (``kernel_size``, ``window_size`` ...).
    """

    def __init__(
        self,
        image_size: int | Sequence[int],
        patch_size: int | Sequence[int],
        in_channels: int,
        num_classes: int,
        dim: int = 64,
        depth: int = 2,
        heads: int = 4,
        *,
        mechanism: str = "softmax",
        pooling: str = "cls",
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        positions: str = "learned",
        **options: Any,
    ):
        super().__init__()
        _check_choice("pooling", pooling, POOLING)
        _check_choice("positions", positions, VIT_POSITIONS)
        check_size("num_classes", num_classes, MAX_WIDTH)
        spatial = _check_mechanism("ViT", mechanism)
        if spatial and pooling == "cls":
            raise InvalidOption(
                f"mechanism {mechanism!r} is spatial: it attends over the patch grid, where a class token has no"
                " place; use pooling='mean'"
            )
        check_size("dim", dim, MAX_WIDTH)
        self.patches = PatchEmbedding(image_size, patch_size, in_channels, dim)
        self.grid = self.patches.grid  # (H/p, W/p)
        self.pooling = pooling
        # the tokens are the grid exactly only without a class token
        self.spatial_shape = self.grid if pooling == "mean" else None
        self.cls = nn.Parameter(0.02 * torch.randn(1, 1, dim)) if pooling == "cls" else None
        tokens = math.prod(self.grid) + (pooling == "cls")
        self.pos = nn.Parameter(0.02 * torch.randn(1, tokens, dim)) if positions == "learned" else None
        self.drop = nn.Dropout(dropout)
        self.blocks = _stage(dim, depth, heads, mechanism, mlp_ratio, dropout, options)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """``images [B, C, H, W]`` -> the final tokens ``[B, (1 +) h·w, dim]`` after the last LN (class token first)."""
        h = self.patches(images)  # [B, h·w, dim]
        if self.cls is not None:
            h = torch.cat([self.cls.expand(h.shape[0], -1, -1), h], dim=1)  # [B, 1 + h·w, dim]
        if self.pos is not None:
            h = h + self.pos
        h = self.drop(h)
        for block in self.blocks:
            h = block(h, spatial_shape=self.spatial_shape)
        return self.norm(h)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``images [B, C, H, W]`` -> logits ``[B, num_classes]``."""
        h = self.features(images)
        pooled = h[:, 0] if self.cls is not None else h.mean(dim=1)  # [B, dim]
        return self.head(pooled)


class HierarchicalViT(nn.Module):
    """Swin-style hierarchical ViT: patch embedding, then stages of pre-LN blocks joined by 2×2 patch merging.

    Stage ``i`` runs ``depths[i]`` blocks of width ``dims[i]`` with ``heads[i]`` heads on its own grid
    (``stage_shapes[i]``: the patch grid, then each side halved, rounded up), then tokens are merged 2×2 into
    ``dims[i + 1]`` channels. The last stage is normalised, mean-pooled and classified.

    Args:
        image_size, patch_size, in_channels, num_classes, mechanism, mlp_ratio, dropout, positions, **options:
            as in :class:`ViT` (the options go to every stage; learned positions are added once, to the patches).
        depths: blocks per stage.
        dims: width per stage (Swin doubles it at each merge: ``(C, 2C, 4C ...)``).
        heads: heads per stage, or one count for all.
    """

    def __init__(
        self,
        image_size: int | Sequence[int],
        patch_size: int | Sequence[int],
        in_channels: int,
        num_classes: int,
        depths: Sequence[int] = (2, 2),
        dims: Sequence[int] = (32, 64),
        heads: int | Sequence[int] = (2, 4),
        *,
        mechanism: str = "softmax",
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        positions: str = "learned",
        **options: Any,
    ):
        super().__init__()
        _check_choice("positions", positions, VIT_POSITIONS)
        check_size("num_classes", num_classes, MAX_WIDTH)
        _check_mechanism("HierarchicalViT", mechanism)
        if not isinstance(depths, Sequence) or not depths:
            raise InvalidOption(f"depths must be a non-empty sequence of blocks per stage, e.g. (2, 2); got {depths!r}")
        depths = tuple(depths)
        dims = _per_stage("dims", dims, len(depths))
        heads = _per_stage("heads", heads, len(depths))
        for d in dims:
            check_size("dims", d, MAX_WIDTH)
        self.patches = PatchEmbedding(image_size, patch_size, in_channels, dims[0])
        shapes = [self.patches.grid]
        for _ in depths[1:]:
            shapes.append(PatchMerging.merged_shape(shapes[-1]))
        self.stage_shapes: tuple[tuple[int, int], ...] = tuple(shapes)
        learned = positions == "learned"
        self.pos = nn.Parameter(0.02 * torch.randn(1, math.prod(shapes[0]), dims[0])) if learned else None
        self.drop = nn.Dropout(dropout)
        self.stages = nn.ModuleList(
            _stage(dims[i], depths[i], heads[i], mechanism, mlp_ratio, dropout, options) for i in range(len(depths))
        )
        self.merges = nn.ModuleList(PatchMerging(dims[i], dims[i + 1]) for i in range(len(depths) - 1))
        self.norm = nn.LayerNorm(dims[-1])
        self.head = nn.Linear(dims[-1], num_classes)

    def stage_outputs(self, images: torch.Tensor) -> list[torch.Tensor]:
        """``images [B, C, H, W]`` -> each stage's tokens ``[B, h_i·w_i, dims[i]]`` (before merging; the last
        one after the final LN)."""
        h = self.patches(images)  # [B, h_0·w_0, dims[0]]
        if self.pos is not None:
            h = h + self.pos
        h = self.drop(h)
        outs = []
        for i, (blocks, shape) in enumerate(zip(self.stages, self.stage_shapes, strict=True)):
            if i:
                h = self.merges[i - 1](h, self.stage_shapes[i - 1])  # [B, h_i·w_i, dims[i]]
            for block in blocks:
                h = block(h, spatial_shape=shape)
            outs.append(h)
        outs[-1] = self.norm(outs[-1])
        return outs

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``images [B, C, H, W]`` -> logits ``[B, num_classes]``."""
        return self.head(self.stage_outputs(images)[-1].mean(dim=1))
