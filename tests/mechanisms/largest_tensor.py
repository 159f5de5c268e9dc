"""What tensors an attention call creates, recorded op by op: a memory check without timing."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class _Shapes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.shapes.extend(tuple(t.shape) for t in tree_leaves(out) if isinstance(t, torch.Tensor))
        return out


def tensor_shapes(fn) -> list[tuple[int, ...]]:
    """Run ``fn()`` without autograd and return the shape of every tensor any op in it produced."""
    mode = _Shapes()
    with torch.no_grad(), mode:
        fn()
    return mode.shapes


def largest_tensor(fn) -> tuple[int, tuple[int, ...]]:
    """Run ``fn()`` and return the element count and shape of the largest tensor any op in it produced."""
    shapes = tensor_shapes(fn) or [()]
    shape = max(shapes, key=lambda s: torch.Size(s).numel())
    return torch.Size(shape).numel(), shape
