"""From a Hugging Face attention call to an attnkit call: the pattern and the key padding mask.

Transformers builds one 4-D mask per call (``[B, 1, Tq, Tk]``, bool or additive float) from the model's own
rules: causal or bidirectional, padding, sliding windows, packed sequences, custom ``and``/``or`` masks.
attnkit expresses a pattern (causal or not) and key padding on top of it, nothing else. So the mask is read
back into ``(pattern, key_padding_mask)`` and rebuilt; when the rebuilt mask differs from the model's, the
model asks for something attnkit cannot express and the call is refused (never a silently different mask).
"""

from __future__ import annotations

import torch

from ..errors import InvalidOption, ShapeError
from ..patterns import Pattern

SELF, CROSS = "self", "cross"  # the role of an attention module


def pattern_and_padding(
    mask: torch.Tensor | None, *, role: str, causal: bool, cross_pattern: Pattern, tq: int, tk: int, where: str
) -> tuple[Pattern, torch.Tensor | None]:
    """The attnkit pattern and ``key_padding_mask [B, Tk]`` (bool, True = real; None: all real) of one call.

    ``mask``: the model's mask (None: no mask, the pattern alone); ``role``: SELF or CROSS; ``causal``: the
    self-attention is causal; ``where``: the module's name, for messages. Raises InvalidOption when the mask
    is not the pattern plus key padding, ShapeError when self-attention has Tq != Tk (a KV cache).
    """
    if role == CROSS:
        pattern, causal = cross_pattern, False  # each query sees the whole context: no causal mask over keys
    else:
        if tq != tk:
            raise ShapeError(
                f"{where}: self-attention with {tq} queries and {tk} keys (a KV cache); attnkit.hf runs"
                " self-attention on whole sequences only: call the model with use_cache=False"
            )
        pattern = Pattern.CAUSAL_SELF if causal else Pattern.NONCAUSAL_SELF
    if mask is None:
        return pattern, None
    allowed = _as_bool(mask, where)  # [B, Tq, Tk]
    if allowed.shape[-2:] != (tq, tk):
        raise ShapeError(f"{where}: the attention mask is {tuple(mask.shape)}, expected [B, 1, {tq}, {tk}]")
    padding = allowed.any(dim=1)  # [B, Tk]: a key some query may see is real
    expected = padding[:, None, :]  # [B, 1, Tk]
    if causal:
        expected = expected & torch.ones(tq, tk, dtype=torch.bool, device=mask.device).tril()
    if not torch.equal(allowed, expected.expand_as(allowed)):
        raise InvalidOption(
            f"{where}: the model's attention mask is not the {pattern.value} pattern plus key padding (it may be a"
            " sliding window, packed sequences or a custom mask); attnkit.hf expresses only a pattern"
            " (noncausal_self, causal_self, or cross attention) with padded keys"
        )
    return pattern, (None if bool(padding.all()) else padding)


def _as_bool(mask: torch.Tensor, where: str) -> torch.Tensor:
    """``mask [B, 1 or H, Tq, Tk]`` -> ``[B, Tq, Tk]`` bool, True = may attend. A float mask must be additive
    0 / -inf (or the dtype's minimum): any other value is a bias (ALiBi, relative positions), refused."""
    if mask.dim() != 4:
        raise ShapeError(f"{where}: expected a 4-D attention mask [B, 1, Tq, Tk]; got shape {tuple(mask.shape)}")
    if mask.dtype == torch.bool:
        allowed = mask
    elif mask.is_floating_point():
        blocked = mask <= torch.finfo(mask.dtype).min / 2  # -inf or the minimum, as transformers writes it
        if not bool(((mask == 0) | blocked).all()):
            raise InvalidOption(
                f"{where}: the attention mask holds values other than 0 and -inf (an additive bias such as ALiBi"
                " or relative positions), which attnkit mechanisms do not take"
            )
        allowed = ~blocked
    else:
        raise InvalidOption(f"{where}: attention mask of dtype {mask.dtype}; expected bool or float")
    if allowed.shape[1] != 1 and not bool((allowed == allowed[:, :1]).all()):
        raise InvalidOption(f"{where}: the attention mask differs between heads; attnkit takes one mask for all heads")
    return allowed[:, 0]
