"""The largest tensor an attention call creates, recorded op by op: a memory check without timing."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class _Largest(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.numel = 0
        self.shape: tuple[int, ...] = ()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.numel() > self.numel:
                self.numel, self.shape = t.numel(), tuple(t.shape)
        return out


def largest_tensor(fn) -> tuple[int, tuple[int, ...]]:
    """Run ``fn()`` and return the element count and shape of the largest tensor any op in it produced."""
    mode = _Largest()
    with torch.no_grad(), mode:
        fn()
    return mode.numel, mode.shape
