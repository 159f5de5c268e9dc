"""Context parallelism: one sequence split over the ranks of a ``torch.distributed`` group (gloo on CPU, NCCL on
GPU), attended exactly as one process would, forward and backward (DESIGN §6).

    attend(q_local, k_local, v_local, mechanism, pattern=..., group=None, strategy="auto", layout="zigzag")
    shard(x, world, rank, layout) / unshard(local, group, layout)

Strategies: ``ring`` (softmax family, log-sum-exp merge, zigzag load balance), ``lasp2`` (linear and decay
families: one all-gather of chunk states), ``halo`` (sliding window: only the window's keys move), ``sum``
(sigmoid: partial outputs add), ``ulysses`` (all-to-all sequence <-> heads, any mechanism whose heads are
independent, heads divisible by W).
"""

from __future__ import annotations

from .api import AUTO_ORDER, STRATEGIES, CPCall, Strategy, attend, choose, register_strategy
from .layout import LAYOUTS, order, padded_length, positions, shard, unshard

__all__ = [
    "AUTO_ORDER",
    "LAYOUTS",
    "STRATEGIES",
    "CPCall",
    "Strategy",
    "attend",
    "choose",
    "order",
    "padded_length",
    "positions",
    "register_strategy",
    "shard",
    "unshard",
]
