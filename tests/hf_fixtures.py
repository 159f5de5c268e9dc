"""Tiny random-init transformers models (no download) and padded batches for the attnkit.hf tests."""

from __future__ import annotations

import torch


def tiny_bert(seed: int = 0, **overrides):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
               max_position_embeddings=64, attn_implementation="eager")  # fmt: skip
    cfg.update(overrides)
    return BertModel(BertConfig(**cfg)).eval()


def padded_batch(lengths=(9, 5, 12, 3), vocab: int = 100, seed: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded random ids: ``input_ids``, ``attention_mask`` ``[N, max(lengths)]`` (pad id 0)."""
    g = torch.Generator().manual_seed(seed)
    t = max(lengths)
    ids = torch.randint(1, vocab, (len(lengths), t), generator=g)
    mask = (torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask}
