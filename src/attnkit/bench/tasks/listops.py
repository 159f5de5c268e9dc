"""ListOps-mini: LRA's ListOps generator (``lra_benchmarks/data/listops.py``; research B §2.2), small.

Nested expressions such as ``[MAX 2 9 [MIN 4 7 ] 0 ]`` over the digits 0-9, with the operators MIN,
MAX, MED (``int(np.median)``) and SM (sum mod 10); the label is the value (10 classes). The close
token ``]`` is kept (LRA before commit c209b2a dropped it, which made the task nearly unsolvable).
Trees grow as in LRA: below ``max_depth`` a node is an operator with probability 1 - VALUE_P = 0.25
(``VALUE_P`` is the leaf probability), with 2 … ``max_args`` children; trees are kept only when
``min_len < length <= seq_len`` tokens (rejection sampling), padded with PAD to ``seq_len``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

from ...patterns import Pattern
from ._base import ACCURACY, Preset, Task, register_task

VALUE_P = 0.25  # LRA's constant: a node below max_depth is an operator when random() <= VALUE_P
MIN, MAX, MED, SM = 10, 11, 12, 13  # token ids; the digits are their own ids 0-9
CLOSE, PAD = 14, 15
_EVAL = {
    MIN: min,
    MAX: max,
    MED: lambda v: int(np.median(v)),  # truncates the mean of the two middle values, as LRA does
    SM: lambda v: sum(v) % 10,
}


@dataclass(frozen=True)
class ListOpsPreset(Preset):
    max_depth: int = 10
    max_args: int = 10
    min_len: int = 500  # keep trees with min_len < length <= seq_len


def _tree(r: random.Random, depth: int, p: ListOpsPreset, root_op: bool = False) -> tuple[list[int], int]:
    """LRA's ``generate_tree`` writing tokens directly: (tokens, value). ``root_op`` skips the draw
    that makes a root a single digit: such a tree is always rejected (min_len >= 1), so the kept
    trees have the same distribution, in a quarter of the draws."""
    if not root_op and (r.random() if depth < p.max_depth else 1.0) > VALUE_P:
        value = r.randrange(10)
        return [value], value
    children = [_tree(r, depth + 1, p) for _ in range(r.randint(2, p.max_args))]
    op = r.choice((MIN, MAX, MED, SM))
    tokens = [op] + [t for toks, _ in children for t in toks] + [CLOSE]
    return tokens, _EVAL[op]([v for _, v in children])


@register_task("listops")
class ListOps(Task):
    VERSION = 1
    patterns = (Pattern.NONCAUSAL_SELF,)
    metric = ACCURACY  # 10-way; chance 10 %, the majority class higher
    output, num_classes = "class", 10  # pool over pad_mask (mean) and classify
    lr = 1e-3  # AdamW, chosen once for softmax (LRA's lr 0.05 is for its rsqrt schedule)
    presets = {
        "quick": ListOpsPreset(
            vocab=16, seq_len=48, n_train=128, n_test=32, steps=50, batch_size=32, max_depth=4, max_args=4, min_len=8
        ),
        # B §7 Q4: depth 5, args 5, 64 < length < 256, 5k/500, about 1,000 steps
        "cpu": ListOpsPreset(
            vocab=16,
            seq_len=255,
            n_train=5000,
            n_test=500,
            steps=1000,
            batch_size=32,
            max_depth=5,
            max_args=5,
            min_len=64,
        ),
        # LRA exact: depth 10, args 10, 500 < length < 2000, 96k train / 2k test, 5,000 steps at batch 32
        "gpu": ListOpsPreset(
            vocab=16,
            seq_len=1999,
            n_train=96_000,
            n_test=2000,
            steps=5000,
            batch_size=32,
            max_depth=10,
            max_args=10,
            min_len=500,
        ),
    }

    def _generate(self, rng, split, n, p: ListOpsPreset):
        r = random.Random(int(rng.integers(2**63)))  # Python's generator draws the scalars fast; seeded from rng
        inputs = np.full((n, p.seq_len), PAD, dtype=np.int64)
        labels = np.empty(n, dtype=np.int64)
        i = 0
        while i < n:  # rejection sampling: most trees are short (cpu preset: about 1 in 170 is kept)
            tokens, value = _tree(r, 1, p, root_op=True)
            if p.min_len < len(tokens) <= p.seq_len:
                inputs[i, : len(tokens)], labels[i] = tokens, value
                i += 1
        return {"inputs": inputs, "targets": labels, "pad_mask": inputs != PAD}
