"""Selective copying (MAD, ``generate_copying_instance(selective=True)``; research B §4.1).

``n_copy`` content tokens lie at random places among blanks; then a ``copy`` token and ``n_copy``
blanks follow. At the i-th trailing blank the model must emit the i-th content token, in order
(the targets sit at the blanks' own positions, not teacher-forced). Every draw, the insertion places
included, comes from the one seeded generator (mad-lab draws those from the global numpy state).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...patterns import Pattern
from ._base import ACCURACY, IGNORE, Preset, Task, register_task


@dataclass(frozen=True)
class SelectiveCopyPreset(Preset):
    n_copy: int = 16  # content tokens to copy


@register_task("selective_copy")
class SelectiveCopy(Task):
    VERSION = 1
    patterns = (Pattern.CAUSAL_SELF,)
    metric = ACCURACY  # over the copied tokens
    lr = 1e-3  # AdamW; MAD keeps the best of 1e-4, 5e-4, 1e-3; chosen once for softmax
    presets = {
        "quick": SelectiveCopyPreset(vocab=16, seq_len=32, n_train=256, n_test=32, steps=50, batch_size=32, n_copy=4),
        # B §7 Q2: V 16, N 128, 8 tokens to copy, 6.4k train, about 800 steps
        "cpu": SelectiveCopyPreset(vocab=16, seq_len=128, n_train=6400, n_test=640, steps=800, batch_size=64, n_copy=8),
        # MAD baseline (configs/tasks/selective-copying.yml): V 16, N 256, 16 tokens, 12.8k / 1.28k, 200 epochs
        "gpu": SelectiveCopyPreset(
            vocab=16, seq_len=256, n_train=12_800, n_test=1280, steps=20_000, batch_size=128, n_copy=16
        ),
    }

    def _generate(self, rng, split, n, p: SelectiveCopyPreset):
        copy, blank = p.vocab - 1, p.vocab - 2  # content tokens are [0, vocab - 2)
        head = p.seq_len - p.n_copy - 1  # content and blanks before the copy token
        if head < p.n_copy:
            raise ValueError(f"selective copy: seq_len {p.seq_len} is too short for {p.n_copy} tokens")
        content = rng.integers(0, blank, size=(n, p.n_copy))  # [n, n_copy], with replacement
        where = np.sort(rng.random((n, head)).argsort(axis=1)[:, : p.n_copy], axis=1)  # their places, in order
        inputs = np.full((n, p.seq_len), blank, dtype=np.int64)
        inputs[np.arange(n)[:, None], where] = content
        inputs[:, head] = copy
        targets = np.full_like(inputs, IGNORE)
        targets[:, head + 1 :] = content  # the i-th trailing blank emits the i-th content token
        return {"inputs": inputs, "targets": targets, "loss_mask": targets != IGNORE}
