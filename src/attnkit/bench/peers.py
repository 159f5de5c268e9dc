"""Peer packages in the speed benchmark: which are installed, their cases, and the timed call.

The adapters themselves (how each package is set up to match its attnkit counterpart, and what
differs) are in ``peer_adapters``.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable

import torch

from ..errors import InvalidOption
from .case import BACKWARD_FLOP_FACTOR
from .peer_adapters import PEERS, Case, PeerSpec

log = logging.getLogger(__name__)

__all__ = ["PEERS", "available_peers", "modes_of", "peer_call", "why_not"]


def available_peers() -> list[str]:
    """The adapters whose package imports here (flex: whether torch has FlexAttention)."""
    names = []
    for name, spec in PEERS.items():
        try:
            importlib.import_module(spec.module)
        except ModuleNotFoundError as err:  # not installed: nothing to say unless asked
            log.debug("peer %s unavailable: %s", name, err)
            continue
        except Exception as err:  # noqa: BLE001 - a broken install is left out, loudly
            log.warning("peer %s is installed but does not import (%s: %s); left out", name, type(err).__name__, err)
            continue
        names.append(name)
    return names


def modes_of(spec: PeerSpec, device: str) -> tuple[str, ...]:
    return ("fwd",) if spec.cpu_fwd_only and not device.startswith("cuda") else ("fwd", "fwdbwd")


def why_not(case: Case) -> str | None:
    """Why the adapter cannot run this case, or None."""
    spec = PEERS.get(case.peer or "")
    if spec is None:
        return f"unknown peer {case.peer!r}; expected one of {', '.join(PEERS)}"
    if case.pattern not in spec.patterns:
        return f"peer {case.peer} does {', '.join(sorted(spec.patterns))}, not {case.pattern}"
    if case.mode not in modes_of(spec, case.device):
        return f"peer {case.peer} runs only {'/'.join(modes_of(spec, case.device))} on {case.device}, not {case.mode}"
    if case.kv_heads != case.heads:
        return f"peer {case.peer} needs kv_heads == heads (got {case.kv_heads} and {case.heads})"
    return spec.check(case)


def peer_call(case: Case, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[Callable[[], object], float]:
    """The timed closure (forward, plus backward for ``fwdbwd``) and its FLOPs, for ``q [B,Tq,H,D]``."""
    reason = why_not(case)
    if reason:
        raise InvalidOption(reason)
    want = (case.batch, case.tq, case.heads, case.head_dim)
    if tuple(q.shape) != want or tuple(k.shape[:2]) != (case.batch, case.tk):
        raise InvalidOption(f"peer {case.peer}: q {tuple(q.shape)} / k {tuple(k.shape)} do not match the case {want}")
    spec = PEERS[case.peer or ""]
    grad = case.mode == "fwdbwd"
    torch.manual_seed(0)  # deterministic weights, random features, hash rotations, k-means starts
    forward = spec.build(case, q, k, v, grad)

    def call() -> torch.Tensor:
        with torch.set_grad_enabled(grad):  # fwd: no autograd graph, even for peers' own parameters
            out = forward()
            if grad:
                out.backward(torch.ones_like(out))
        return out

    return call, spec.flops(case) * (BACKWARD_FLOP_FACTOR if grad else 1.0)
