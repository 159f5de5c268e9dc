"""Inputs of benchmark cases, and which fast paths a mechanism offers for a pattern (no test helpers)."""

from __future__ import annotations

import torch

from ..inputs import AttentionInputs
from ..mechanism import FastPath, Mechanism
from ..patterns import Pattern


def make_qkv(
    batch: int,
    tq: int,
    tk: int,
    heads: int,
    kv_heads: int,
    dk: int,
    dv: int | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    seed: int = 42,
    requires_grad: bool = False,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random ``q [B,Tq,H,Dk], k [B,Tk,Hkv,Dk], v [B,Tk,Hkv,Dv]`` from a fixed seed."""
    g = torch.Generator().manual_seed(seed)
    dv = dv or dk
    shapes = ((batch, tq, heads, dk), (batch, tk, kv_heads, dk), (batch, tk, kv_heads, dv))
    ts = [torch.randn(s, generator=g).to(device=device, dtype=dtype) for s in shapes]
    for t in ts:
        t.requires_grad_(requires_grad)
    return ts[0], ts[1], ts[2]


def probe_inputs(pattern: Pattern, tq: int = 8, tk: int = 8, device: str = "cpu") -> AttentionInputs:
    """Small inputs for asking a path whether it supports a pattern (no compute)."""
    q, k, v = (torch.zeros(1, t, 2, 4, device=device) for t in (tq, tk, tk))
    return AttentionInputs(q, k, v, pattern, 0.5, None, None, False)


def paths_for(cls: type[Mechanism], mech: Mechanism, pattern: Pattern, device: str = "cpu") -> list[FastPath]:
    """The fast paths that accept ``pattern`` on plain inputs on ``device``."""
    x = probe_inputs(pattern, 8, 8 if pattern.is_self else 12, device)
    if cls.spatial:  # the 8 queries on a 2 x 4 grid
        x = x.replace(spatial_shape=(2, 4))
    return [p for p in cls._fast_paths if not p.not_supported_reasons(mech, x)]
