"""Head roles from the maps, as TransformerLens's ``head_detector`` scores them: previous-token, duplicate-token
and induction, each a detection pattern ``P`` (0/1, ``[B, T, T]``) and the ``mul`` score ``sum(A * P) / sum(A)``.

One difference from TransformerLens: the sums run over the queries that *have* a target under ``P`` (a query
with no earlier duplicate of its token cannot be a duplicate-token query), so a perfect head scores 1 whatever
the input; TransformerLens divides by every row and a perfect duplicate-token head scores the share of
duplicated tokens. Natural sentences have few duplicates, so :func:`repeated_tokens` builds the usual probe:
random tokens, repeated once (``x1 .. xn x1 .. xn``), where every second-half token has a duplicate and an
induction target.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..errors import InvalidOption
from .maps import AttentionMaps

ROLES = ("previous_token", "duplicate_token", "induction")


def previous_token_pattern(real: torch.Tensor) -> torch.Tensor:
    """``[B, T, T]``: query i -> key i - 1 (both real)."""
    t = real.shape[1]
    p = torch.ones(t, t, dtype=torch.bool).tril(-1).triu(-1)  # the sub-diagonal
    return p[None] & real[:, :, None] & real[:, None, :]


def duplicate_token_pattern(tokens: list[list[str]], real: torch.Tensor) -> torch.Tensor:
    """``[B, T, T]``: query i -> every earlier key j < i holding the same token."""
    same = _same_token(tokens)  # [B, T, T]
    t = real.shape[1]
    return same & torch.ones(t, t, dtype=torch.bool).tril(-1)[None] & real[:, :, None] & real[:, None, :]


def induction_pattern(tokens: list[list[str]], real: torch.Tensor) -> torch.Tensor:
    """``[B, T, T]``: query i -> key j whose previous token j - 1 (< i) equals token i (the duplicate-token
    pattern shifted one key to the right, as TransformerLens builds it)."""
    dup = duplicate_token_pattern(tokens, real)
    shifted = torch.zeros_like(dup)
    shifted[:, :, 1:] = dup[:, :, :-1]
    return shifted & real[:, None, :]


def _same_token(tokens: list[list[str]]) -> torch.Tensor:
    rows = []
    for seq in tokens:
        ids: dict[str, int] = {}
        code = torch.tensor([ids.setdefault(s, len(ids)) for s in seq])
        rows.append(code[:, None] == code[None, :])
    return torch.stack(rows)


def patterns(maps: AttentionMaps) -> dict[str, torch.Tensor | None]:
    """Each role's detection pattern on these maps (None where it needs tokens and the maps have none)."""
    real = maps.real()
    out: dict[str, torch.Tensor | None] = {"previous_token": previous_token_pattern(real)}
    for name, build in (("duplicate_token", duplicate_token_pattern), ("induction", induction_pattern)):
        out[name] = None if maps.tokens is None else build(maps.tokens, real)
    return out


def mul_score(p: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """``[H]``: ``sum(A * P) / sum(A)`` over the queries with a target under ``P`` (NaN: no such query).
    ``p [B, H, T, T]`` is the attention read as distributions (``metrics.distributions``)."""
    has_target = pattern.any(-1)  # [B, T]
    on = (p * pattern[:, None]).sum(-1)  # [B, H, T]
    total = p.sum(-1)
    keep = has_target[:, None].expand_as(on)
    num = (on * keep).sum((0, 2))
    den = (total * keep).sum((0, 2))
    return torch.where(den > 0, num / den.clamp_min(1e-30), torch.full_like(num, float("nan")))


# ---- the repeated random-token probe ----------------------------------------------------------------------


def repeated_tokens(
    vocab: int, *, length: int = 20, batch: int = 4, seed: int = 0, low: int = 0, prefix: list[int] | None = None,
    suffix: list[int] | None = None,
) -> tuple[torch.Tensor, list[list[str]]]:  # fmt: skip
    """The induction probe: ``batch`` rows of ``length`` random ids from ``[low, vocab)``, each repeated once,
    between optional ``prefix``/``suffix`` ids (BERT's [CLS] / [SEP]). Returns (ids ``[B, T]``, token strings
    ``"#id"``, with which the duplicate and induction patterns are built)."""
    if isinstance(length, bool) or not isinstance(length, int) or length < 2:
        raise InvalidOption(f"length={length!r} is not valid; expected an integer >= 2 (tokens before repeating)")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise InvalidOption(f"batch={batch!r} is not valid; expected a positive integer")
    if not 0 <= low < vocab - 1:
        raise InvalidOption(f"token ids [{low}, {vocab}) leave fewer than 2 ids to draw from")
    gen = torch.Generator().manual_seed(seed)
    half = torch.randint(low, vocab, (batch, length), generator=gen)
    ids = torch.cat([half, half], dim=1)
    pre = torch.tensor(prefix or [], dtype=torch.long).expand(batch, -1)
    post = torch.tensor(suffix or [], dtype=torch.long).expand(batch, -1)
    ids = torch.cat([pre, ids, post], dim=1)
    return ids, [[f"#{i}" for i in row.tolist()] for row in ids]


def probe(model: Any, *, vocab: int | None = None, tokenizer: Any = None, length: int = 20, batch: int = 4,
          seed: int = 0, capture_fn: Callable[..., AttentionMaps] | None = None) -> AttentionMaps:  # fmt: skip
    """Capture ``model`` on the repeated random-token probe; ``metrics.measure`` of the result scores the roles.

    attnkit models take the ids ``[B, 2n]`` (``vocab`` their vocabulary size). A Hugging Face model takes
    ``{"input_ids", "attention_mask"}``; with ``tokenizer`` the ids avoid the special tokens' (drawn above the
    largest special id) and are wrapped in its [CLS] ... [SEP] when it has them."""
    from .capture import _is_hf_model, capture

    capture_fn = capture_fn or capture
    if _is_hf_model(model):
        vocab = vocab or model.config.vocab_size
        special = list(getattr(tokenizer, "all_special_ids", []) or [])
        low = max(special) + 1 if special else 0
        cls, sep = getattr(tokenizer, "cls_token_id", None), getattr(tokenizer, "sep_token_id", None)
        ids, tokens = repeated_tokens(vocab, length=length, batch=batch, seed=seed, low=low,
                                      prefix=[cls] if cls is not None else None,
                                      suffix=[sep] if sep is not None else None)  # fmt: skip
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        return capture_fn(model, inputs, tokens=tokens)
    if vocab is None:
        vocab = getattr(model, "vocab", None) or getattr(getattr(model, "inputs", None), "vocab", None)
    if vocab is None:
        raise InvalidOption("probe() needs vocab= for this model (the number of token ids it takes)")
    ids, tokens = repeated_tokens(vocab, length=length, batch=batch, seed=seed)
    return capture_fn(model, ids, tokens=tokens)
