"""Multi-query associative recall (Zoology, ``zoology/data/multiquery_ar.py``; research B §3.1).

A sequence opens with K key-value pairs ``k1 v1 … kK vK`` (keys from ``[1, V/2)``, values from
``[V/2, V)``, distinct within a sequence), then a query region where every key comes back once,
at gaps drawn from ``p(i) ∝ a·i^(a-1)`` (a = 0.01: mostly short gaps). At each query the model must
predict the value that was paired with that key. ``num_passes = 1``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...patterns import Pattern
from ._base import ACCURACY, IGNORE, Preset, Task, register_task


@dataclass(frozen=True)
class MQARPreset(Preset):
    num_kv_pairs: int  # K; needs 4·K <= seq_len
    power_a: float = 0.01
    random_non_queries: bool = True  # fill the query region's blanks with random tokens


def _distinct(rng: np.random.Generator, n: int, low: int, high: int, k: int) -> np.ndarray:
    """``[n, k]``: k distinct integers from ``[low, high)`` per row (a random permutation's head)."""
    return rng.random((n, high - low)).argsort(axis=1)[:, :k] + low


@register_task("mqar")
class MQAR(Task):
    VERSION = 1
    patterns = (Pattern.CAUSAL_SELF,)
    metric = ACCURACY  # over the query positions only, per sequence, then averaged
    lr = 3e-3  # AdamW, chosen once for softmax (reaches 1.0 by step 400 at the cpu preset, research B §8)
    presets = {
        "quick": MQARPreset(vocab=64, seq_len=32, n_train=256, n_test=64, steps=50, batch_size=32, num_kv_pairs=4),
        # B §7 Q1 / §8: V 128, N 64, K 8, 8k/500, batch 64; softmax solves it in about 400 steps
        "cpu": MQARPreset(vocab=128, seq_len=64, n_train=8000, n_test=500, steps=600, batch_size=64, num_kv_pairs=8),
        # Zoology Fig. 2 at N = 256: V 8192, K 16, 100k/3k, batch 256, 64 epochs
        "gpu": MQARPreset(
            vocab=8192, seq_len=256, n_train=100_000, n_test=3000, steps=25_000, batch_size=256, num_kv_pairs=16
        ),
    }

    def _generate(self, rng: np.random.Generator, split: str, n: int, p: MQARPreset) -> dict[str, np.ndarray]:
        V, N, K = p.vocab, p.seq_len, p.num_kv_pairs
        if N % 2 or V <= N or 4 * K > N:
            raise ValueError(f"MQAR needs an even seq_len < vocab and 4·K <= seq_len; got V={V}, N={N}, K={K}")
        context = 2 * K
        keys = _distinct(rng, n, 1, V // 2, K)  # [n, K]
        values = _distinct(rng, n, V // 2, V, K)  # [n, K]
        kvs = np.empty((n, context), dtype=np.int64)
        kvs[:, 0::2], kvs[:, 1::2] = keys, values  # k1 v1 k2 v2 …

        # K distinct gaps per row from range(space) with p(i) ∝ a·i^(a-1): Gumbel top-k is sampling
        # without replacement in proportion to p, like Zoology's np.random.choice(replace=False, p=p).
        space = (N - context) // 2
        logp = np.log(p.power_a) + (p.power_a - 1) * np.log(np.arange(1, space + 1))
        gaps = np.argsort(-(logp + rng.gumbel(size=(n, space))), axis=1)[:, :K]  # [n, K]

        rows = np.arange(n)[:, None]
        queries = np.zeros((n, N - context + 1), dtype=np.int64)
        queries[rows, 2 * gaps] = keys
        labels = np.full((n, N + 1), IGNORE, dtype=np.int64)
        labels[rows, 2 * gaps + context + 1] = values

        inputs = np.concatenate([kvs, queries], axis=1)[:, :-1]  # [n, N]
        targets = labels[:, 1:]  # [n, N]: the value sits at the query key's own position
        if p.random_non_queries:
            blank = inputs == 0
            inputs[blank] = rng.integers(0, V, size=int(blank.sum()))
        return {"inputs": inputs, "targets": targets, "loss_mask": targets != IGNORE}
