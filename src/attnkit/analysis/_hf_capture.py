"""Capture from a Hugging Face ``PreTrainedModel``: eager attention with ``output_attentions=True``.

transformers 5.x returns attention weights only from eager attention: sdpa and flash return an empty tuple and
log a warning (research D §4.1). So the model is switched to eager for the call and back after, and a capture
that brings back no weights is refused rather than passed on empty. Values come from a forward hook on each
attention module's value projection (``value`` in BERT and ViT, ``v_proj`` in LLaMA-style models), best effort:
None where the architecture has no separate one (GPT-2's fused ``c_attn``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..errors import InvalidOption, ShapeError
from .capture import check_length, check_tokens, run_model
from .maps import AttentionMaps, grid_and_prefix

log = logging.getLogger(__name__)

VALUE_PROJECTIONS = ("value", "v_proj")  # the value projection's child name in an attention module


def capture_hf(
    model: nn.Module,
    inputs: Any,
    *,
    tokens: Sequence[Sequence[str]] | None = None,
    tokenizer: Any = None,
    spatial_shape: tuple[int, ...] | None = None,
    prefix: int | None = None,
    **forward_kwargs: Any,
) -> AttentionMaps:
    """:func:`attnkit.analysis.capture` for a Hugging Face model (see there)."""
    if not hasattr(inputs, "keys"):
        raise InvalidOption(
            f"a Hugging Face model's inputs are the tokenizer's BatchEncoding or a dict (input_ids, attention_mask,"
            f" pixel_values ...); got {type(inputs).__name__}"
        )
    inputs = dict(inputs)
    ids = inputs.get("input_ids")
    if ids is not None:
        check_length(ids.shape[-1])
    attention_modules = _attention_modules(model)
    previous = model.config._attn_implementation
    values: list[torch.Tensor] = []
    handles = [_value_hook(m, values) for m in attention_modules]
    training = model.training
    try:
        if previous != "eager":
            model.set_attn_implementation("eager")
        model.eval()
        with torch.no_grad():
            out = run_model(model, inputs, output_attentions=True, **forward_kwargs)
    finally:
        for h in handles:
            if h is not None:
                h.remove()
        model.train(training)
        if previous != "eager":
            model.set_attn_implementation(previous)
    attentions = getattr(out, "attentions", None)
    if not attentions:
        raise InvalidOption(
            f"{type(model).__name__} returned no attention weights with output_attentions=True under eager attention;"
            " its attention does not report them, so there is nothing to capture"
        )
    weights = [a.detach().float().cpu() for a in attentions]  # [B, H, T, T] each
    b, h, tq, tk = weights[0].shape
    check_length(tk)
    kpm = _padding(inputs, b, tk)
    if kpm is not None:
        weights = [w * kpm[:, None, None, :] * kpm[:, None, :, None] for w in weights]  # padded rows: 0
    grid, prefix = _grid(model, inputs, tk, spatial_shape, prefix)
    return AttentionMaps(
        weights=weights,
        values=_values(values, len(weights), h),
        layer_names=_layer_names(model, attention_modules, len(weights)),
        mechanisms=[f"softmax ({model.config._attn_implementation})"] * len(weights),
        source="hf",
        tokens=check_tokens(tokens, b, tk) if tokens is not None else _tokens(tokenizer, ids),
        key_padding_mask=kpm,
        causal=_causal(model, attention_modules),
        spatial_shape=grid,
        prefix=prefix,
    )


def _attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules whose outputs transformers records as ``attentions`` (``_can_record_outputs``), in order."""
    recorded = (getattr(model, "_can_record_outputs", None) or {}).get("attentions")
    classes = recorded if isinstance(recorded, list | tuple) else [recorded]
    types = tuple(getattr(c, "target_class", c) for c in classes if c is not None)
    types = tuple(t for t in types if isinstance(t, type))
    if not types:
        return []
    return [(name, m) for name, m in model.named_modules() if isinstance(m, types)]


def _value_hook(entry: tuple[str, nn.Module], store: list[torch.Tensor]):
    _, module = entry
    for child in VALUE_PROJECTIONS:
        proj = getattr(module, child, None)
        if isinstance(proj, nn.Linear):
            return proj.register_forward_hook(lambda _m, _a, out: store.append(out.detach().float().cpu()))
    return None


def _values(recorded: list[torch.Tensor], layers: int, heads: int) -> list[torch.Tensor | None]:
    """``[B, T, H, Dv]`` per layer from the projections' ``[B, T, Hkv * Dv]`` outputs (None if not one per layer)."""
    if len(recorded) != layers:
        if recorded:
            log.info("capture: %d value projections seen for %d layers; values not kept", len(recorded), layers)
        return [None] * layers
    out: list[torch.Tensor | None] = []
    for v in recorded:
        b, t, width = v.shape
        if width % heads:  # GQA: fewer value heads; their width tells how many only with head_dim known
            out.append(None)
            continue
        out.append(v.view(b, t, heads, width // heads))
    return out


def _padding(inputs: dict, batch: int, tk: int) -> torch.Tensor | None:
    mask = inputs.get("attention_mask")
    if mask is None:
        return None
    if tuple(mask.shape) != (batch, tk):
        raise ShapeError(f"attention_mask has shape {tuple(mask.shape)}; expected [B, T] = ({batch}, {tk})")
    return mask.detach().cpu().bool()


def _causal(model: nn.Module, modules: list[tuple[str, nn.Module]]) -> bool:
    """Causal when the config says it is a decoder or the attention modules attend causally (GPT-2, LLaMA)."""
    if getattr(model.config, "is_decoder", False):
        return True
    return any(getattr(m, "is_causal", False) is True for _, m in modules)


def _tokens(tokenizer: Any, ids: torch.Tensor | None) -> list[list[str]] | None:
    if tokenizer is None or ids is None:
        return None
    return [tokenizer.convert_ids_to_tokens(row.tolist()) for row in ids]


def _layer_names(model: nn.Module, modules: list[tuple[str, nn.Module]], layers: int) -> list[str]:
    if len(modules) == layers:
        return [name for name, _ in modules]
    return [f"layer {i}" for i in range(layers)]


def _grid(model: nn.Module, inputs: dict, tk: int, spatial_shape, prefix) -> tuple[tuple[int, ...] | None, int]:
    """An image model's patch grid (from the config: image_size / patch_size) and its prefix (CLS and the like)."""
    if spatial_shape is None and "pixel_values" in inputs:
        image, patch = getattr(model.config, "image_size", None), getattr(model.config, "patch_size", None)
        if image is not None and patch is not None:
            image = (image, image) if isinstance(image, int) else tuple(image)
            patch = (patch, patch) if isinstance(patch, int) else tuple(patch)
            spatial_shape = tuple(i // p for i, p in zip(image, patch, strict=True))
    return grid_and_prefix(spatial_shape, prefix, tk)
