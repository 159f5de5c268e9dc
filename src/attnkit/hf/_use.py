"""``use`` and ``restore``: switch a Hugging Face model's attention to an attnkit mechanism and back.

Each attention module of the model (a module whose ``forward`` dispatches through transformers'
``ALL_ATTENTION_FUNCTIONS``) gets its own mechanism as a registered submodule ``module.attnkit``, sized by
the module's heads and head dim, so a trainable mechanism's parameters train and save with the model.
"""

from __future__ import annotations

import functools
import inspect
import logging
from typing import Any

from torch import nn

from ..api import create
from ..errors import InvalidOption, ShapeError
from ..mechanism import Mechanism
from ..patterns import Pattern, as_pattern
from . import _interface
from ._interface import NAME, Settings
from ._masks import CROSS, SELF

log = logging.getLogger(__name__)

_PREVIOUS = "_attnkit_previous_attn_implementation"  # attribute of the model: what `restore` goes back to
_HEADS = ("num_heads", "num_attention_heads", "n_head", "n_heads")
_HEAD_DIM = ("head_dim", "attention_head_size", "head_size")
_CROSS_NAMES = ("crossattention", "cross_attn", "encoder_attn")  # attribute names of cross attention in HF models


def use(
    model: nn.Module,
    mechanism: str = "softmax",
    *,
    cross_pattern: Pattern | str = Pattern.CAUSAL_CROSS,
    ignore_dropout: bool = False,
    **options: Any,
) -> nn.Module:
    """Run every attention layer of the transformers ``model`` with attnkit's ``mechanism`` (in place).

    ``options`` are the mechanism's (``attnkit.info(mechanism).options``). Self-attention runs in the
    pattern the model sets (``causal_self`` for decoders, ``noncausal_self`` for encoders) with the model's
    padding as ``key_padding_mask``; cross attention runs in ``cross_pattern`` (``causal_cross``: decoder
    queries come one by one, so a mechanism that mixes queries cannot leak later ones). A call whose mask
    attnkit cannot express, attention dropout in training (unless ``ignore_dropout=True``: then none is
    applied) and self-attention with a KV cache are refused. Returns the model; :func:`restore` undoes it.
    """
    cross = as_pattern(cross_pattern)
    if cross not in (Pattern.NONCAUSAL_CROSS, Pattern.CAUSAL_CROSS):
        raise InvalidOption(f"cross_pattern must be noncausal_cross or causal_cross; got {cross.value}")
    _check_model(model)
    found = attention_modules(model)
    if not found:
        raise InvalidOption(
            f"{type(model).__name__} has no attention module that dispatches through transformers'"
            " AttentionInterface (ALL_ATTENTION_FUNCTIONS); attnkit.hf cannot switch it"
        )
    mechs = {where: _mechanism_for(where, module, mechanism, options) for where, module in found}  # check all first
    _interface.register()
    previous = getattr(model, _PREVIOUS, None) or model.config._attn_implementation
    for where, module in found:
        module.attnkit = mechs[where]  # a registered submodule: its parameters are the model's
        module.attnkit_settings = Settings(
            where=where,
            role=_role(where, module),
            causal=_causal(module, model),
            cross_pattern=cross,
            ignore_dropout=ignore_dropout,
        )
    model.set_attn_implementation(NAME)
    if model.config._attn_implementation != NAME:
        raise InvalidOption(f"{type(model).__name__} did not switch to attn_implementation={NAME!r}")
    setattr(model, _PREVIOUS, previous)
    log.info("attnkit.hf: %d attention modules of %s run %s", len(found), type(model).__name__, mechanism)
    return model


def restore(model: nn.Module) -> nn.Module:
    """Undo :func:`use`: the implementation the model had before, and no attnkit submodules."""
    previous = getattr(model, _PREVIOUS, None)
    if previous is None:
        raise InvalidOption(f"{type(model).__name__} was not switched by attnkit.hf.use; nothing to restore")
    for _, module in attention_modules(model):
        for attr in ("attnkit", "attnkit_settings"):
            if hasattr(module, attr):
                delattr(module, attr)
    model.set_attn_implementation(previous)
    delattr(model, _PREVIOUS)
    return model


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every module whose class dispatches attention through ALL_ATTENTION_FUNCTIONS."""
    return [(name, m) for name, m in model.named_modules() if _dispatches(type(m))]


def mechanisms(model: nn.Module) -> dict[str, Mechanism]:
    """The attnkit mechanism of each attention module of a model switched by :func:`use`, by module name."""
    return {
        name: m.attnkit for name, m in attention_modules(model) if isinstance(getattr(m, "attnkit", None), Mechanism)
    }


@functools.cache
def _dispatches(cls: type) -> bool:
    forward = cls.__dict__.get("forward")
    if forward is None:
        return False
    try:
        return "ALL_ATTENTION_FUNCTIONS" in inspect.getsource(forward)
    except (OSError, TypeError):
        return False


def _check_model(model) -> None:
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "set_attn_implementation"):
        raise InvalidOption(f"expected a transformers PreTrainedModel; got {type(model).__name__}")
    can_set = getattr(model, "_can_set_attn_implementation", None)
    if can_set is not None and not can_set():  # transformers would only log a warning and not switch
        raise InvalidOption(
            f"{type(model).__name__} does not dispatch attention through transformers' AttentionInterface,"
            " so its attention implementation cannot be switched"
        )


def _mechanism_for(where: str, module: nn.Module, mechanism: str, options: dict[str, Any]) -> Mechanism:
    heads, head_dim = _first_int(module, _HEADS), _first_int(module, _HEAD_DIM)
    config = getattr(module, "config", None)
    if heads is None and config is not None:
        heads = getattr(config, "num_attention_heads", None)
    if head_dim is None and config is not None and heads:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if heads is None or head_dim is None:
        raise ShapeError(f"{where} ({type(module).__name__}): cannot read its number of heads and head dim")
    return create(mechanism, heads=heads, head_dim=head_dim, **options)


def _first_int(module: nn.Module, names: tuple[str, ...]) -> int | None:
    for name in names:
        value = getattr(module, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _role(where: str, module: nn.Module) -> str:
    """CROSS for cross attention (the module says so, its class is a cross attention, or HF names it so)."""
    cross = (
        bool(getattr(module, "is_cross_attention", False))
        or "CrossAttention" in type(module).__name__
        or any(part in _CROSS_NAMES for part in where.split("."))
    )
    return CROSS if cross else SELF


def _causal(module: nn.Module, model: nn.Module) -> bool | None:
    value = getattr(module, "is_causal", None)
    if isinstance(value, bool):
        return value
    decoder = getattr(model.config, "is_decoder", None)
    return decoder if isinstance(decoder, bool) else None
