"""Small pieces every peer adapter uses: the case's options, and inputs laid out as a peer expects them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .case import BenchCase as Case

NS, CS, NC, CC = "noncausal_self", "causal_self", "noncausal_cross", "causal_cross"
Forward = Callable[[], torch.Tensor]


def _opt(case: Case, name: str) -> Any:
    """The case's value of a counterpart option, else the peer's default (imported here: PEERS is built from
    the adapters, which import this module)."""
    from .peer_adapters import PEERS

    return case.options.get(name, PEERS[case.peer or ""].options[name])


def _bhtd(t: torch.Tensor, grad: bool) -> torch.Tensor:
    # [B,T,H,D] -> [B,H,T,D] as a new leaf, made here so that the layout change is not timed
    return t.detach().transpose(1, 2).contiguous().requires_grad_(grad)


def _tokens(t: torch.Tensor, grad: bool) -> torch.Tensor:
    # [B,T,H,D] -> x [B,T,H*D], the input of a module-level peer (a view: q is contiguous)
    b, n, h, d = t.shape
    return t.detach().reshape(b, n, h * d).requires_grad_(grad)


def _module(m: torch.nn.Module, like: torch.Tensor) -> torch.nn.Module:
    # eval(): every dropout is 0 anyway; it also stops training-only bookkeeping (caches, k-means EMA)
    return m.to(device=like.device, dtype=like.dtype).eval()


def _bh(case: Case) -> int:
    return case.batch * case.heads
