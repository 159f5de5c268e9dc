"""Byte-level language modelling on text that ships with Python (research B §5 and §7 Q6).

Documents are the pydoc topics (``pydoc_data.topics``: the language reference in English) and, for
the larger presets, the standard library's own ``.py`` files. Each document goes to train or test by
a hash of its name (about 1 in 10 to test), so no text is shared between the splits; examples are
windows of ``seq_len + 1`` bytes inside one document. The corpus is this Python's, so its version is
stored with the data (``info["python"]``).
"""

from __future__ import annotations

import functools
import platform
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...patterns import Pattern
from ._base import BITS_PER_BYTE, Preset, Task, register_task

_TEST_SHARE = 10  # a document is in test when crc32(name) % 10 == 0


@dataclass(frozen=True)
class ByteLMPreset(Preset):
    corpus: str = "pydoc"  # "pydoc", "pydoc+stdlib-top" (top-level Lib/*.py) or "pydoc+stdlib" (all of Lib)
    max_bytes: int | None = None  # stop adding documents (in name order) beyond this many bytes


@functools.lru_cache(maxsize=4)
def _documents(corpus: str, max_bytes: int | None) -> tuple[tuple[str, bytes], ...]:
    """(name, bytes) of every document, in a fixed order, up to ``max_bytes`` in all."""
    from pydoc_data.topics import topics

    docs = [(f"pydoc/{k}", topics[k].encode()) for k in sorted(topics)]
    if corpus != "pydoc":
        lib = Path(sysconfig.get_paths()["stdlib"])
        files = lib.glob("*.py") if corpus == "pydoc+stdlib-top" else lib.rglob("*.py")
        rel = sorted(str(f.relative_to(lib)) for f in files if "site-packages" not in f.parts)
        docs += [(f"Lib/{r}", (lib / r).read_bytes()) for r in rel]
    kept, total = [], 0
    for name, text in docs:
        if max_bytes is not None and total + len(text) > max_bytes:
            break
        kept.append((name, text))
        total += len(text)
    return tuple(kept)


def _split_of(name: str) -> str:
    return "test" if zlib.crc32(name.encode()) % _TEST_SHARE == 0 else "train"


@register_task("byte_lm")
class ByteLM(Task):
    VERSION = 1
    patterns = (Pattern.CAUSAL_SELF,)
    metric = BITS_PER_BYTE  # needs logits [N, T, 256]
    lr = 1e-3  # AdamW, chosen once for softmax
    presets = {
        "quick": ByteLMPreset(vocab=256, seq_len=64, n_train=256, n_test=64, steps=50, batch_size=32),
        # B §7 Q6: N 256, about 400 steps, a slice of about 2 MB
        "cpu": ByteLMPreset(
            vocab=256, seq_len=256, n_train=12_800, n_test=500, steps=400, batch_size=32,
            corpus="pydoc+stdlib-top", max_bytes=2_000_000,
        ),
        # B §7 Q6 GPU: N 1K, the whole standard library (about 31 MB on 3.11)
        "gpu": ByteLMPreset(
            vocab=256, seq_len=1024, n_train=50_000, n_test=2000, steps=10_000, batch_size=32, corpus="pydoc+stdlib"
        ),
    }  # fmt: skip

    def data_info(self, p: ByteLMPreset):
        return {"python": platform.python_version(), "corpus": p.corpus}

    def _generate(self, rng, split, n, p: ByteLMPreset):
        docs = [t for name, t in _documents(p.corpus, p.max_bytes) if _split_of(name) == split and len(t) > p.seq_len]
        if not docs:
            raise ValueError(f"byte_lm: no {split} document longer than {p.seq_len} bytes in corpus {p.corpus!r}")
        text = np.frombuffer(b"".join(docs), dtype=np.uint8)
        starts = np.cumsum([0] + [len(t) for t in docs[:-1]])  # each document's offset in text
        n_starts = np.array([len(t) - p.seq_len for t in docs])  # window starts that stay in the document
        first = np.cumsum(n_starts) - n_starts
        pick = rng.integers(0, n_starts.sum(), size=n)  # uniform over all windows of the split
        doc = np.searchsorted(first, pick, side="right") - 1
        begin = starts[doc] + (pick - first[doc])  # [n]
        windows = text[begin[:, None] + np.arange(p.seq_len + 1)].astype(np.int64)  # [n, T + 1]
        return {"inputs": windows[:, :-1], "targets": windows[:, 1:], "loss_mask": np.ones((n, p.seq_len), bool)}
