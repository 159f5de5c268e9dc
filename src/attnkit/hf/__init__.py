"""attnkit mechanisms inside Hugging Face transformers models (the optional extra ``attnkit[hf]``).

- :func:`use` switches a model's attention to an attnkit mechanism (through ``AttentionInterface`` and
  ``AttentionMaskInterface``); :func:`restore` switches it back.
- :func:`embedding_similarity` compares two models' mean-pooled sentence embeddings (cosine per sentence).
- :func:`convert` distils each layer's softmax attention into a Hedgehog feature map and switches to it.
"""

from __future__ import annotations

from ..errors import MissingDependency

try:
    import transformers  # noqa: F401
except ImportError as err:  # pragma: no cover - depends on the environment
    raise MissingDependency("attnkit.hf needs transformers; install the extra: pip install 'attnkit[hf]'") from err

from ._use import attention_modules, mechanisms, restore, use
from .convert import ConversionReport, convert
from .embeddings import embedding_similarity, sentence_embeddings
from .sentences import EVAL_SENTENCES, TRAIN_SENTENCES

__all__ = [
    "EVAL_SENTENCES",
    "TRAIN_SENTENCES",
    "ConversionReport",
    "attention_modules",
    "convert",
    "embedding_similarity",
    "mechanisms",
    "restore",
    "sentence_embeddings",
    "use",
]
