"""``capture(model, inputs)``: per-layer, per-head attention maps of attnkit models and Hugging Face models.

attnkit models (any ``nn.Module`` holding :class:`attnkit.nn.Attention` layers): a forward pre-hook on each
layer's mechanism records the call (q, k, v, pattern, key padding, grid, scale) and a forward hook its output.
The weights are then read out with one-hot values (:func:`attnkit.viz.one_hot_weights`), one input at a time,
on the reference path. That is exact for every mechanism affine in v, and it is what shows the implicit
attention matrix of kernel, decay and recurrent mechanisms (``phi(q_i) . phi(k_j) / normaliser``, with decay),
which never exists as a tensor in their fast paths. The read-out is checked against the real call: the
recorded output must equal ``A v + out(v = 0)``; a mechanism for which it does not (channel attention, which
mixes channels by a softmax of k and v; dynamic_mask, which picks keys by their values; a mechanism drawing
new random features per call) is refused with :class:`~attnkit.errors.InvalidOption` naming the layer.

Hugging Face models go through ``_hf_capture`` (eager attention, ``output_attentions=True``).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import InvalidOption, ShapeError
from ..patterns import as_pattern
from ..viz import one_hot_weights
from .maps import AttentionMaps, grid_and_prefix

log = logging.getLogger(__name__)

MAX_TOKENS = 4096  # a capture holds [B, H, T, T] per layer; beyond this neither memory nor the views cope
READOUT_TOL = 1e-3  # relative: ||out - (A v + out(0))|| / ||out||, the read-out's check against the real call


def capture(
    model: nn.Module,
    inputs: Any,
    *,
    tokens: Sequence[Sequence[str]] | None = None,
    tokenizer: Any = None,
    layers: Callable[[str], bool] | Sequence[str] | None = None,
    spatial_shape: tuple[int, ...] | None = None,
    prefix: int | None = None,
    **forward_kwargs: Any,
) -> AttentionMaps:
    """Run ``model`` on ``inputs`` once and return the attention of every (self-)attention layer.

    Args:
        model: an attnkit model (any ``nn.Module`` with :class:`attnkit.nn.Attention` layers) or a Hugging Face
            ``PreTrainedModel``.
        inputs: what the model takes: a tensor (``model(inputs)``), a tuple (``model(*inputs)``) or a dict /
            ``BatchEncoding`` (``model(**inputs)``).
        tokens: per input, its token strings (used for labels, sinks and token roles). With a Hugging Face model
            and ``tokenizer`` given instead, they are read from ``input_ids``.
        layers: attnkit models only: which layers to capture, by module path (a list of names, or a predicate);
            default every self-attention layer (cross attention is skipped: its keys are another sequence).
        spatial_shape, prefix: the patch grid the tokens after the first ``prefix`` lie on (image models).
            Default: what the model says (an attnkit ``ViT``'s grid and class token; the call's
            ``spatial_shape``; a Hugging Face ViT's config).
        **forward_kwargs: more keyword arguments for the model's forward.

    Weights are float32 on the CPU, ``[B, H, T, T]`` per layer; padded keys and padded queries' rows are 0.
    Raises before running the model for more than ``MAX_TOKENS`` tokens, and ``InvalidOption`` for a model with no
    attention layers, a mechanism whose weights cannot be read (not affine in v) or a decoding-state call.
    The model's mode (train / eval) is restored and every hook removed, whatever happens.
    """
    if _is_hf_model(model):
        from ._hf_capture import capture_hf

        return capture_hf(model, inputs, tokens=tokens, tokenizer=tokenizer, spatial_shape=spatial_shape,
                          prefix=prefix, **forward_kwargs)  # fmt: skip
    if not isinstance(model, nn.Module):
        raise InvalidOption(
            f"capture() takes an nn.Module (an attnkit model or a Hugging Face PreTrainedModel); got {type(model)}"
        )
    if tokenizer is not None:
        raise InvalidOption("tokenizer= is for Hugging Face models; give an attnkit model's tokens with tokens=")
    return capture_attnkit(model, inputs, tokens=tokens, layers=layers, spatial_shape=spatial_shape, prefix=prefix,
                           **forward_kwargs)  # fmt: skip


def _is_hf_model(model: Any) -> bool:
    transformers = sys.modules.get("transformers")  # never imported here: a model of it means it is loaded
    return transformers is not None and isinstance(model, transformers.PreTrainedModel)


def run_model(model: nn.Module, inputs: Any, **forward_kwargs: Any) -> Any:
    """``model(inputs)``, ``model(*inputs)`` or ``model(**inputs)``, by the kind of ``inputs``."""
    if isinstance(inputs, torch.Tensor):
        return model(inputs, **forward_kwargs)
    if isinstance(inputs, tuple | list):
        return model(*inputs, **forward_kwargs)
    if hasattr(inputs, "keys"):  # dict, BatchEncoding
        return model(**dict(inputs), **forward_kwargs)
    raise InvalidOption(f"inputs must be a tensor, a tuple of the model's arguments or a dict; got {type(inputs)}")


def check_length(t: int) -> None:
    if t > MAX_TOKENS:
        raise InvalidOption(f"inputs of {t} tokens are too long to capture [T, T] maps; at most {MAX_TOKENS}")


def check_tokens(tokens: Sequence[Sequence[str]] | None, batch: int, length: int) -> list[list[str]] | None:
    """Token strings, one list of ``length`` per input, or None."""
    if tokens is None:
        return None
    tokens = [list(t) for t in tokens]
    if len(tokens) != batch or any(len(t) != length for t in tokens):
        got = [len(t) for t in tokens]
        raise ShapeError(f"tokens must hold {batch} lists of {length} strings (one per input token); got lengths {got}")
    return [[str(s) for s in t] for t in tokens]


# ---- attnkit models ---------------------------------------------------------------------------------------


@dataclass
class _Call:
    """One recorded call of a layer's mechanism."""

    name: str
    mechanism: nn.Module
    q: torch.Tensor  # [B, Tq, Hq, Dk]
    k: torch.Tensor  # [B, Tk, Hkv, Dk]
    v: torch.Tensor  # [B, Tk, Hkv, Dv]
    kwargs: dict[str, Any]
    out: torch.Tensor | None = None  # [B, Tq, Hq, Dv]


def capture_attnkit(
    model: nn.Module,
    inputs: Any,
    *,
    tokens: Sequence[Sequence[str]] | None = None,
    layers: Callable[[str], bool] | Sequence[str] | None = None,
    spatial_shape: tuple[int, ...] | None = None,
    prefix: int | None = None,
    **forward_kwargs: Any,
) -> AttentionMaps:
    """:func:`capture` for attnkit models (see there)."""
    chosen = _attention_layers(model, layers)
    if isinstance(inputs, torch.Tensor) and inputs.dim() >= 2 and inputs.dtype in (torch.long, torch.int):
        check_length(inputs.shape[1])  # token ids [B, T]: refused before the forward
    calls = _record(model, chosen, inputs, **forward_kwargs)
    if not calls:
        raise InvalidOption("the model ran without calling any of its self-attention layers; nothing to capture")
    weights, values = zip(*(_read_out(c) for c in calls), strict=True)
    _check_same_sizes(calls, weights)
    first = calls[0]
    kpm = first.kwargs.get("key_padding_mask")
    grid, prefix = _grid(model, first, spatial_shape, prefix)
    pattern = as_pattern(first.kwargs["pattern"])
    return AttentionMaps(
        weights=list(weights),
        values=list(values),
        layer_names=[c.name for c in calls],
        mechanisms=[getattr(c.mechanism, "name", type(c.mechanism).__name__) for c in calls],
        source="attnkit",
        tokens=check_tokens(tokens, first.q.shape[0], first.q.shape[1]),
        key_padding_mask=None if kpm is None else kpm.detach().cpu().bool(),
        causal=pattern.is_causal,
        spatial_shape=grid,
        prefix=prefix,
    )


def _attention_layers(model: nn.Module, layers: Callable[[str], bool] | Sequence[str] | None) -> dict[str, nn.Module]:
    from ..nn.attention import Attention

    found = {name or type(model).__name__: m for name, m in model.named_modules() if isinstance(m, Attention)}
    if not found:
        raise InvalidOption(
            f"{type(model).__name__} holds no attnkit.nn.Attention layers to capture (and is no Hugging Face model)"
        )
    if layers is None:
        chosen = {n: m for n, m in found.items() if m.pattern.is_self}
        for name in sorted(set(found) - set(chosen)):
            log.info("capture: %s skipped (cross attention: its keys are another sequence)", name)
        return chosen
    if callable(layers):
        chosen = {n: m for n, m in found.items() if layers(n)}
    else:
        unknown = sorted(set(layers) - set(found))
        if unknown:
            raise InvalidOption(f"layers {unknown} are not attention layers of the model; they are {sorted(found)}")
        chosen = {n: found[n] for n in found if n in set(layers)}
    if not chosen:
        raise InvalidOption(f"layers= selects none of the model's attention layers {sorted(found)}")
    return chosen


def _record(model: nn.Module, layers: dict[str, nn.Module], inputs: Any, **forward_kwargs: Any) -> list[_Call]:
    calls: list[_Call] = []
    handles = []

    def pre_hook(name: str):
        def hook(mech, args, kwargs):
            if kwargs.get("state") is not None or kwargs.get("return_state"):
                raise InvalidOption(
                    f"layer {name} was called with decoding state; capture runs the model on whole sequences"
                )
            q, k, v = args[:3] if len(args) >= 3 else (kwargs["q"], kwargs["k"], kwargs["v"])
            check_length(k.shape[1])
            calls.append(_Call(name, mech, q.detach(), k.detach(), v.detach(), dict(kwargs)))

        return hook

    def post_hook(mech, args, kwargs, out):
        calls[-1].out = out.detach()

    training = model.training
    try:
        for name, layer in layers.items():
            handles.append(layer.mechanism.register_forward_pre_hook(pre_hook(name), with_kwargs=True))
            handles.append(layer.mechanism.register_forward_hook(post_hook, with_kwargs=True))
        model.eval()  # no dropout: the maps of the model as it predicts
        with torch.no_grad():
            run_model(model, inputs, **forward_kwargs)
    finally:
        for h in handles:
            h.remove()
        model.train(training)
    return calls


def _read_out(call: _Call) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights ``[B, Hq, Tq, Tk]``, values ``[B, Tk, Hq, Dv]``) of one call, checked against its output."""
    kw = call.kwargs
    pattern = as_pattern(kw["pattern"])
    kpm = kw.get("key_padding_mask")
    hq, hkv = call.q.shape[2], call.k.shape[2]
    rows, offsets = [], []
    mech = call.mechanism
    training = mech.training
    try:
        mech.eval()
        with torch.no_grad():
            for b in range(call.q.shape[0]):  # one input at a time: S + 1 rows of one-hot values each
                a, c = one_hot_weights(
                    mech, call.q[b : b + 1], call.k[b : b + 1], value_dim=call.v.shape[-1],
                    key_padding_mask=None if kpm is None else kpm[b : b + 1], pattern=pattern,
                    spatial_shape=kw.get("spatial_shape"), scale=kw.get("scale"), path="reference", with_offset=True,
                )  # fmt: skip
                rows.append(a)
                offsets.append(c)
    finally:
        mech.train(training)
    weights = torch.cat(rows)  # [B, Hq, Tq, Tk]
    values = call.v.float().repeat_interleave(hq // hkv, dim=2)  # [B, Tk, Hq, Dv]
    _check_readout(call, weights, values, torch.cat(offsets))
    if kpm is not None:
        real = kpm.bool()
        weights = weights * real[:, None, None, :]  # padded keys: 0
        if pattern.is_self:
            weights = weights * real[:, None, :, None]  # padded queries' rows: 0
    return weights.cpu(), values.cpu()


def _check_readout(call: _Call, weights: torch.Tensor, values: torch.Tensor, offset: torch.Tensor) -> None:
    """The read-out must give the call's own output: ``out == A v + out(v = 0)`` on the real queries."""
    if call.out is None:
        return
    predicted = torch.einsum("bhij,bjhd->bihd", weights, values.to(weights.device)) + offset  # [B, Tq, Hq, Dv]
    out = call.out.float()
    kpm = call.kwargs.get("key_padding_mask")
    if kpm is not None and as_pattern(call.kwargs["pattern"]).is_self:
        keep = kpm.bool()[:, :, None, None]
        out, predicted = out * keep, predicted * keep
    gap = (out - predicted).norm().item()
    size = out.norm().item()
    if not gap <= READOUT_TOL * max(size, 1e-6):
        name = getattr(call.mechanism, "name", type(call.mechanism).__name__)
        raise InvalidOption(
            f"layer {call.name}: mechanism {name} is not affine in v on these inputs (||out - (A v + out(0))|| ="
            f" {gap:.3g}, {gap / max(size, 1e-12):.3g} of ||out||, tolerance {READOUT_TOL}), so its attention"
            " weights cannot be read out; capture the other layers with layers=..."
        )


def _check_same_sizes(calls: list[_Call], weights: Sequence[torch.Tensor]) -> None:
    sizes = {(w.shape[1], w.shape[2], w.shape[3]) for w in weights}
    if len(sizes) > 1:
        each = ", ".join(f"{c.name}: {tuple(w.shape[1:])}" for c, w in zip(calls, weights, strict=True))
        raise ShapeError(
            f"the captured layers differ in heads or tokens ({each}); one capture holds layers of one size:"
            " choose them with layers=..."
        )


def _grid(model: nn.Module, call: _Call, spatial_shape, prefix) -> tuple[tuple[int, ...] | None, int]:
    """The patch grid and the tokens before it: given, else the call's, else an attnkit ViT's (class token)."""
    t = call.q.shape[1]
    if spatial_shape is None:
        spatial_shape = call.kwargs.get("spatial_shape")
    if spatial_shape is None and getattr(model, "grid", None) is not None and getattr(model, "cls", None) is not None:
        spatial_shape = tuple(model.grid)
    return grid_and_prefix(spatial_shape, prefix, t)
