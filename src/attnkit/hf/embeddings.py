"""Sentence embeddings of a transformers model and how far two models' embeddings are apart.

The embedding is MiniLM's (sentence-transformers' pooling for all-MiniLM-L6-v2): the mean of
``last_hidden_state`` over the real tokens, then L2-normalised. Inputs are sentences (tokenised with the
given tokenizer, or the one saved beside the model) or an already tokenised batch (``input_ids`` and
``attention_mask``), e.g. for a random-init model without a tokenizer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..errors import InvalidOption, MissingDependency, ShapeError
from .sentences import EVAL_SENTENCES

Batch = Mapping[str, torch.Tensor]  # input_ids [N, T] and attention_mask [N, T] (1 = real token)


def tokenize(inputs: Sequence[str] | Batch, model: nn.Module, tokenizer=None) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` (``[N, T]``, padded) of sentences or of a tokenised batch."""
    if isinstance(inputs, Mapping):
        return _checked_batch(inputs)
    if isinstance(inputs, str) or not isinstance(inputs, Sequence) or not inputs:
        raise InvalidOption(f"expected a non-empty list of sentences or a tokenised batch; got {type(inputs).__name__}")
    if not all(isinstance(s, str) and s for s in inputs):
        raise InvalidOption("every sentence must be a non-empty string")
    tok = tokenizer if tokenizer is not None else _saved_tokenizer(model)
    enc = tok(list(inputs), padding=True, truncation=True, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def _checked_batch(batch: Batch) -> dict[str, torch.Tensor]:
    missing = [k for k in ("input_ids", "attention_mask") if k not in batch]
    if missing:
        raise InvalidOption(f"a tokenised batch needs input_ids and attention_mask; missing {', '.join(missing)}")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    if ids.dim() != 2 or ids.shape != mask.shape or ids.shape[0] == 0:
        raise ShapeError(
            f"input_ids {tuple(ids.shape)} and attention_mask {tuple(mask.shape)} must both be [N, T] with N > 0"
        )
    if not bool((mask.sum(-1) > 0).all()):
        raise InvalidOption("every input needs at least one real token (attention_mask row of zeros)")
    return {"input_ids": ids, "attention_mask": mask}


def _saved_tokenizer(model: nn.Module):
    from transformers import AutoTokenizer

    path = getattr(model, "name_or_path", "") or ""
    if not path:
        raise MissingDependency("the model has no saved tokenizer (name_or_path is empty); pass tokenizer=")
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise MissingDependency(f"no tokenizer could be loaded from {path!r} ({err}); pass tokenizer=") from err


@torch.no_grad()
def sentence_embeddings(
    model: nn.Module, inputs: Sequence[str] | Batch = EVAL_SENTENCES, *, tokenizer=None, batch_size: int = 16
) -> torch.Tensor:
    """``[N, D]`` unit-length sentence embeddings: mean of ``last_hidden_state`` over real tokens, L2-normalised."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidOption(f"batch_size must be a positive int; got {batch_size!r}")
    enc = tokenize(inputs, model, tokenizer)
    was_training = model.training
    model.eval()
    try:
        starts = range(0, len(enc["input_ids"]), batch_size)
        parts = [_embed(model, {k: v[i : i + batch_size] for k, v in enc.items()}) for i in starts]
    finally:
        model.train(was_training)
    return torch.cat(parts)


def _embed(model: nn.Module, enc: dict[str, torch.Tensor]) -> torch.Tensor:
    device = next(model.parameters()).device
    enc = {k: v.to(device) for k, v in enc.items()}
    out = model(**enc)
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is None:
        raise InvalidOption(f"{type(model).__name__} returns no last_hidden_state; pass the base model (AutoModel)")
    real = enc["attention_mask"].to(hidden.dtype).unsqueeze(-1)  # [N, T, 1]
    mean = (hidden * real).sum(1) / real.sum(1)  # [N, D]
    return torch.nn.functional.normalize(mean.float(), dim=-1).cpu()


def embedding_similarity(
    model_a: nn.Module, model_b: nn.Module, sentences: Sequence[str] | Batch = EVAL_SENTENCES, *, tokenizer=None
) -> torch.Tensor:
    """``[N]`` cosine similarity of the two models' sentence embeddings, per sentence (1 = unchanged).

    ``model_a`` and ``model_b`` may be the same object at two moments; compare a model with embeddings kept
    from before a change with ``sentence_embeddings`` instead. The built-in EVAL_SENTENCES are the default.
    """
    batch = tokenize(sentences, model_a, tokenizer)  # one tokenisation for both models
    a = sentence_embeddings(model_a, batch)
    b = sentence_embeddings(model_b, batch)
    return (a * b).sum(-1)
