"""The attention function and mask function attnkit registers with transformers, under the name ``attnkit``.

Transformers calls ``attnkit_attention(module, query, key, value, attention_mask, scaling=, dropout=, ...)``
from every attention module of a model whose implementation is ``attnkit`` (research/D_analytics.md §4).
The mechanism that runs is the module's own ``module.attnkit`` (set by :func:`attnkit.hf.use`), with the
settings in ``module.attnkit_settings``. The mask function makes transformers build a full boolean mask for
every call (no "skip": the mask is read back into a pattern and key padding, see ``_masks.py``); without a
registered mask function transformers passes no mask at all and padding would leak.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import sdpa_mask

from ..errors import AttnkitError, InvalidOption
from ..patterns import Pattern
from ._masks import CROSS, pattern_and_padding

NAME = "attnkit"  # the attn_implementation name models are switched to
# keywords some models pass that change what attention computes; attnkit mechanisms cannot honour them
_REFUSED_KWARGS = ("sliding_window", "softcap", "s_aux", "sinks", "position_bias", "head_mask")


@dataclass(frozen=True)
class Settings:
    """How one HF attention module runs its attnkit mechanism (set by ``use``)."""

    where: str  # the module's name in the model, for messages
    role: str  # "self" or "cross"
    causal: bool | None  # self-attention: the model's setting (a call's is_causal keyword overrides it)
    cross_pattern: Pattern  # the pattern of cross-attention calls
    ignore_dropout: bool  # True: run without attention dropout in training (else refuse dropout > 0)


def attnkit_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """``query [B, Hq, Tq, D]``, ``key``/``value [B, Hkv, Tk, D]`` (HF layout) -> ``([B, Tq, Hq, Dv], None)``.

    No weights are returned (attnkit never forms the T x T matrix), so ``output_attentions`` gives nothing.
    """
    mech = getattr(module, "attnkit", None)
    settings = getattr(module, "attnkit_settings", None)
    if mech is None or settings is None:
        raise AttnkitError(
            f"{type(module).__name__} runs attn_implementation={NAME!r} but holds no attnkit mechanism;"
            " switch models with attnkit.hf.use(model, ...), not set_attn_implementation('attnkit')"
        )
    _check_kwargs(settings, module, dropout, kwargs)
    causal = kwargs.get("is_causal")
    causal = settings.causal if causal is None else bool(causal)
    if causal is None and settings.role != CROSS:
        raise InvalidOption(f"{settings.where}: cannot tell whether this self-attention is causal (no is_causal)")
    pattern, padding = pattern_and_padding(
        attention_mask,
        role=settings.role,
        causal=bool(causal),
        cross_pattern=settings.cross_pattern,
        tq=query.shape[2],
        tk=key.shape[2],
        where=settings.where,
    )
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # [B, T, H, D], attnkit's layout
    extra = {"scale": scaling} if (mech.uses_scale and scaling is not None) else {}
    out = mech(q, k, v, pattern=pattern, key_padding_mask=padding, **extra)  # [B, Tq, Hq, Dv]
    return out, None


def _check_kwargs(settings: Settings, module, dropout, kwargs) -> None:
    if dropout and module.training and not settings.ignore_dropout:
        raise InvalidOption(
            f"{settings.where}: attention dropout {dropout} in training; attnkit mechanisms apply no attention"
            " dropout. Pass ignore_dropout=True to attnkit.hf.use (train without it) or set the model's"
            " attention dropout probability to 0"
        )
    given = [name for name in _REFUSED_KWARGS if kwargs.get(name) is not None]
    if given:
        raise InvalidOption(
            f"{settings.where}: the model passes {', '.join(given)} to its attention, which changes what attention"
            " computes; attnkit mechanisms cannot honour it"
        )


def attnkit_mask(*args, **kwargs):
    """transformers' boolean mask (True = may attend), always built: with the skips allowed transformers
    would return None for a causal or unpadded call, and the attention function could not check it."""
    kwargs["allow_is_causal_skip"] = False
    kwargs["allow_is_bidirectional_skip"] = False
    return sdpa_mask(*args, **kwargs)


def register() -> None:
    """Register the attention and mask functions under ``NAME`` (idempotent)."""
    AttentionInterface.register(NAME, attnkit_attention)
    AttentionMaskInterface.register(NAME, attnkit_mask)
