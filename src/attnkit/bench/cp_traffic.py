"""Bytes a rank sends during a context-parallel step, measured by wrapping ``torch.distributed``'s calls, and the
algorithms' formulas to compare them with (research/C_kernels_distributed.md §8.4).

Counted as the bytes leaving this rank under the usual algorithms: an all-to-all sends ``(W-1)/W`` of its input,
an all-gather its input to each of the W-1 others, a reduce-scatter ``(W-1)/W`` of its input, an all-reduce twice
that (ring), a point-to-point send its tensor (``send`` and the ``isend`` ops of ``batch_isend_irecv``; a bare
``isend`` is not counted: wrapping it would break ``P2POp``'s identity check). Floating-point payload (the
attention's tensors) is kept apart from the rest (the size check's int64, a padding mask's bytes).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class Traffic:
    payload: int = 0  # bytes of floating-point tensors sent
    other: int = 0  # bytes of other tensors sent (sizes, masks)
    calls: int = 0

    def add(self, t: torch.Tensor, factor: float) -> None:
        n = round(t.numel() * t.element_size() * factor)
        if t.is_floating_point():
            self.payload += n
        else:
            self.other += n
        self.calls += 1


def _world(kwargs: dict[str, Any]) -> int:
    return dist.get_world_size(kwargs.get("group"))


# call name -> (position and keyword of the tensor sent, bytes sent as a multiple of it, a function of W)
_COLLECTIVES = {
    "all_to_all_single": (1, "input", lambda w: (w - 1) / w),
    "all_gather_into_tensor": (1, "input_tensor", lambda w: w - 1),
    "all_gather_single": (1, "input_tensor", lambda w: w - 1),
    "reduce_scatter_tensor": (1, "input", lambda w: (w - 1) / w),
    "reduce_scatter_single": (1, "input", lambda w: (w - 1) / w),
    "all_reduce": (0, "tensor", lambda w: 2 * (w - 1) / w),
    "send": (0, "tensor", lambda w: 1),
}


@contextlib.contextmanager
def counting() -> Iterator[Traffic]:
    """Count what this rank sends while the block runs (the calls go through as usual)."""
    traffic = Traffic()
    names = [name for name in _COLLECTIVES if hasattr(dist, name)]  # the *_single names: torch >= 2.13
    saved = {name: getattr(dist, name) for name in (*names, "batch_isend_irecv")}

    def wrap(name: str, fn):
        where, keyword, factor = _COLLECTIVES[name]

        def counted(*args, **kwargs):
            sent = args[where] if len(args) > where else kwargs.get(keyword)
            if isinstance(sent, torch.Tensor):
                traffic.add(sent, factor(_world(kwargs)))
            return fn(*args, **kwargs)

        return counted

    def batch(ops, *args, **kwargs):
        for op in ops:
            if getattr(op.op, "__name__", "") == "isend":
                traffic.add(op.tensor, 1)
        return saved["batch_isend_irecv"](ops, *args, **kwargs)

    try:
        for name in names:
            setattr(dist, name, wrap(name, saved[name]))
        dist.batch_isend_irecv = batch
        yield traffic
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)


def formula_bytes(strategy: str, *, world: int, tokens: int, batch: int, heads: int, kv_heads: int, head_dim: int,
                  element_size: int, options: dict[str, Any], mech=None, pattern: str = "causal_self",
                  layout: str = "zigzag") -> tuple[int, int] | None:  # fmt: skip
    """(forward, backward) payload bytes one rank sends per step by the algorithm's formula (research §8.4); None
    when attnkit has no formula for this strategy.

    - ring: K, V travel W-1 hops forward; backward K, V travel W-1 hops again and dK, dV W hops (home to their
      owner): (W-1)·KV forward, (2W-1)·KV backward, KV = B·n·Hkv·2D elements.
    - sum: one all-gather of K, V forward, its adjoint reduce-scatter backward: (W-1)·KV each way.
    - lasp2: one all-gather of the chunk states forward, one reduce-scatter backward: (W-1)·states each way, with
      states = pieces·K·B·Hs·F·Dv' (pieces 2 on zigzag; K = 2 for a noncausal decay; Hs the heads that keep a state;
      F the feature width; Dv' = D + 1 with a normaliser), in fp32 for fp32 inputs — independent of T.
    - halo: the window's w-1 rows of K, V (and the mask) each way.
    - ulysses: q, k, v and out forward, their gradients backward, (W-1)/W of each.
    """
    n, w, d, e = tokens // world, world, head_dim, element_size
    if w == 1:
        return 0, 0
    if strategy == "ulysses":
        each = batch * n * (2 * heads * d + 2 * kv_heads * d) * e * (w - 1) // w
        return each, each
    kv = batch * n * kv_heads * 2 * d * e
    if strategy == "ring":
        return (w - 1) * kv, (2 * w - 1) * kv
    if strategy == "sum":
        return (w - 1) * kv, (w - 1) * kv
    if strategy == "lasp2" and mech is not None:
        pieces = 2 if layout == "zigzag" else 1
        both_ways = 2 if (pattern == "noncausal_self" and getattr(mech, "decays", False)) else 1
        state_heads = heads if getattr(mech, "decays", False) or mech.trainable else kv_heads
        width = d + (1 if getattr(mech, "normalised", True) else 0)
        states = pieces * both_ways * batch * state_heads * mech.state_dk(d) * width * max(e, 4)
        return (w - 1) * states, (w - 1) * states
    if strategy == "halo" and "window" in options:
        rows = min(options["window"] - 1, n)
        return batch * rows * kv_heads * 2 * d * e, batch * rows * kv_heads * 2 * d * e
    return None
