"""Autocast (automatic mixed precision): attention runs like the ops on autocast's lower-precision list.

Under ``torch.autocast(device, dtype)``, ``F.scaled_dot_product_attention`` (like matmul and linear) casts
its floating inputs to the autocast dtype and returns that dtype. attnkit does the same for every mechanism
and path: q, k, v are cast once (fp64 is left alone, as autocast does), and the mechanism then runs with
autocast off, exactly as it runs on inputs of that dtype: its own fp32 accumulation, custom autograd
functions that see one dtype, the same output dtype on every path.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch


def autocast_dtype(t: object) -> torch.dtype | None:
    """The dtype autocast gives attention on ``t``'s device, or None where autocast is off (or does not
    apply to ``t``: not a floating tensor, or fp64)."""
    if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dtype == torch.float64:
        return None
    device = t.device.type
    if not torch.amp.is_autocast_available(device) or not torch.is_autocast_enabled(device):
        return None
    return torch.get_autocast_dtype(device)


def cast_floating(dtype: torch.dtype, *ts: object) -> list[object]:
    """Each floating tensor other than fp64 cast to ``dtype`` (autocast's rule); anything else as given."""
    return [
        t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64 else t
        for t in ts
    ]


def autocast_off(fn: Callable) -> Callable:
    """For ``forward`` and ``backward`` of a custom ``torch.autograd.Function``: run with autocast off on the
    device of the first tensor argument (what ``torch.amp.custom_fwd``/``custom_bwd`` do for one fixed device
    type). A backward called inside an autocast region then computes in the dtypes its forward saved, instead
    of mixing autocast's bf16 products into fp32 accumulators (``Input dtypes must be the same``)."""

    @functools.wraps(fn)
    def wrapper(ctx, *args):
        device = next((a.device.type for a in args if isinstance(a, torch.Tensor)), None)
        if device is None or not torch.amp.is_autocast_available(device) or not torch.is_autocast_enabled(device):
            return fn(ctx, *args)
        with torch.autocast(device, enabled=False):
            return fn(ctx, *args)

    return wrapper
