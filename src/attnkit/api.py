"""The functional entry points: ``attend``, ``create``, ``mechanisms``, ``info``."""

from __future__ import annotations

import functools
from typing import Any

import torch

from .errors import AttnkitError
from .mechanism import REGISTRY, Mechanism, MechanismInfo
from .patterns import Pattern, as_pattern
from .state import State


def create(name: str, heads: int | None = None, head_dim: int | None = None, **options: Any) -> Mechanism:
    """Build mechanism ``name`` as an ``nn.Module`` (with its parameters, if it has any).

    ``heads`` and ``head_dim`` size trainable mechanisms; parameter-free ones accept any shape.
    """
    return REGISTRY.get(name)(heads=heads, head_dim=head_dim, **options)


@functools.lru_cache(maxsize=256)
def _shared_instance(name: str, options: tuple[tuple[str, Any], ...]) -> Mechanism:
    # parameter-free mechanisms are stateless: one instance per (name, options) serves every call
    return create(name, **dict(options))


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mechanism: str = "softmax",
    *,
    pattern: Pattern | str,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    state: State | None = None,
    return_state: bool = False,
    path: str = "auto",
    spatial_shape: tuple[int, ...] | None = None,
    **options: Any,
):
    """Attention of ``q [B,Tq,Hq,Dk]`` over ``k [B,Tk,Hkv,Dk]``, ``v [B,Tk,Hkv,Dv]`` -> ``[B,Tq,Hq,Dv]``.

    ``pattern`` is one of ``noncausal_self``, ``causal_self``, ``noncausal_cross``, ``causal_cross``.
    ``options`` are the mechanism's own (see ``attnkit.info(name).options``). With
    ``return_state=True`` returns ``(out, state)`` to continue the sequence in a later call.
    """
    cls = REGISTRY.get(mechanism)
    if cls.trainable:
        raise AttnkitError(
            f"{mechanism} has trainable parameters, so attend() cannot build it per call; use"
            f" m = attnkit.create({mechanism!r}, heads=..., head_dim=...) and call m(q, k, v, pattern=...),"
            f" or attnkit.Attention(dim, heads, mechanism={mechanism!r})"
        )
    try:
        key = tuple(sorted(options.items()))
        hash(key)
        mech = _shared_instance(mechanism, key)
    except TypeError:  # an unhashable option value: build a private instance
        mech = create(mechanism, **options)
    return mech(
        q,
        k,
        v,
        pattern=pattern,
        scale=scale,
        key_padding_mask=key_padding_mask,
        state=state,
        return_state=return_state,
        path=path,
        spatial_shape=spatial_shape,
    )


def mechanisms(
    name: str = "*", *, pattern: Pattern | str | None = None, kind: str | None = None
) -> list[MechanismInfo]:
    """Every registered mechanism whose name matches the wildcard, optionally only those that
    support ``pattern`` or are of ``kind`` (``attention`` or ``mixer``)."""
    wanted = as_pattern(pattern) if pattern is not None else None
    out = []
    for n in REGISTRY.names(name):
        i = REGISTRY.get(n).info()
        if (wanted is None or wanted in i.patterns) and (kind is None or i.kind == kind):
            out.append(i)
    return out


def info(name: str) -> MechanismInfo:
    """The ``MechanismInfo`` of one mechanism (raises ``UnknownMechanism`` with suggestions)."""
    return REGISTRY.get(name).info()
