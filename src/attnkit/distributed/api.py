"""``attnkit.distributed.attend``: one sequence split over the ranks of a process group, attended with a strategy
that fits the mechanism's family (DESIGN §6, research/C_kernels_distributed.md).

A strategy is a class registered with :func:`register_strategy`: ``refuses(...)`` says why it cannot run a
mechanism (None when it can) and ``run(call)`` gives this rank's output ``[B, n, Hq, Dv]``, differentiable with
respect to the local q, k, v. ``strategy="auto"`` takes the first strategy of :data:`AUTO_ORDER` that does not refuse
and logs which; when none fits, the error names every strategy and why it refused.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.distributed as dist

from ..api import create
from ..errors import InvalidOption, ShapeError, UnsupportedPattern
from ..inputs import validate
from ..mechanism import Mechanism
from ..patterns import Pattern, as_pattern
from ._collectives import all_gather_flat
from .faults import collective
from .layout import check_layout, check_length, positions

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 60.0  # seconds a collective may wait before every rank gives up with an error
# the order "auto" tries: the specialised strategies first, Ulysses (any mechanism) last
AUTO_ORDER = ("halo", "lasp2", "sum", "ring", "ulysses")


@dataclass(frozen=True)
class CPCall:
    """One rank's part of a context-parallel call (inputs already validated, padded k, v zeroed)."""

    q: torch.Tensor  # [B, n, Hq, Dk]: this rank's queries
    k: torch.Tensor  # [B, n, Hkv, Dk]
    v: torch.Tensor  # [B, n, Hkv, Dv]
    mech: Mechanism
    pattern: Pattern
    scale: float
    key_padding_mask: torch.Tensor | None  # [B, n] bool, True = real token; None: all real
    group: dist.ProcessGroup | None
    world: int
    rank: int
    layout: str
    total: int  # T: the whole sequence's length
    positions: torch.Tensor  # [n] int64: the global positions of this rank's tokens
    timeout: float


class Strategy:
    """How the ranks cooperate for one family of mechanisms (subclass and register)."""

    name: ClassVar[str]
    summary: ClassVar[str]  # one line for errors and --help

    def refuses(
        self, mech: Mechanism, pattern: Pattern, *, layout: str, world: int, total: int, heads: int, kv_heads: int
    ):
        """None when this strategy computes ``mech`` exactly in ``pattern`` for a sequence of ``total`` tokens over
        ``world`` ranks in ``layout``; else the reason, in a few words."""
        raise NotImplementedError

    def run(self, call: CPCall) -> torch.Tensor:
        raise NotImplementedError


STRATEGIES: dict[str, Strategy] = {}


def register_strategy(cls: type[Strategy]) -> type[Strategy]:
    STRATEGIES[cls.name] = cls()
    return cls


def choose(mech: Mechanism, pattern: Pattern, strategy: str, **sizes: Any) -> Strategy:
    """The strategy to run: the one named, or with ``"auto"`` the first of AUTO_ORDER that fits."""
    _load_strategies()
    if strategy != "auto":
        if strategy not in STRATEGIES:
            raise InvalidOption(f"strategy={strategy!r} is not valid; expected auto or one of {', '.join(STRATEGIES)}")
        reason = STRATEGIES[strategy].refuses(mech, pattern, **sizes)
        if reason:
            raise InvalidOption(f"strategy {strategy!r} cannot run {mech.name} ({pattern.value}): {reason}")
        return STRATEGIES[strategy]
    reasons = {}
    for name in AUTO_ORDER:
        if name in STRATEGIES:
            reasons[name] = STRATEGIES[name].refuses(mech, pattern, **sizes)
            if reasons[name] is None:
                log.info("context parallel: %s (%s) runs with strategy %s", mech.name, pattern.value, name)
                return STRATEGIES[name]
    why = "; ".join(f"{n}: {r}" for n, r in reasons.items())
    raise InvalidOption(f"no context-parallel strategy fits {mech.name} ({pattern.value}) — {why}")


def _load_strategies() -> None:
    """Import the strategy modules (each registers itself); a missing one is simply not offered."""
    import importlib

    for name in ("ring", "lasp2", "halo", "sum", "ulysses"):
        try:
            importlib.import_module(f"{__package__}.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"{__package__}.{name}":
                raise


def attend(
    q_local: torch.Tensor,
    k_local: torch.Tensor,
    v_local: torch.Tensor,
    mechanism: str | Mechanism = "softmax",
    *,
    pattern: Pattern | str,
    group: dist.ProcessGroup | None = None,
    strategy: str = "auto",
    layout: str = "zigzag",
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    **options: Any,
) -> torch.Tensor:
    """Attend this rank's shard of one sequence to the whole sequence, with every rank of ``group`` calling it.

    ``q_local [B, n, Hq, Dk]``, ``k_local``/``v_local [B, n, Hkv, D]`` are this rank's tokens in ``layout``
    (:func:`attnkit.distributed.shard` cuts a full tensor that way); ``key_padding_mask [B, n]`` marks this rank's
    real tokens. Returns this rank's output ``[B, n, Hq, Dv]``, equal (to rounding) to the matching rows of one
    process attending the whole sequence; gradients flow to the local q, k, v. ``mechanism`` is a name (built with
    ``options``) or a module — a trainable one must hold the same parameters on every rank.
    """
    pattern = as_pattern(pattern)
    if not pattern.is_self:
        raise UnsupportedPattern(
            f"context parallelism splits one sequence over the ranks: it takes noncausal_self or causal_self, not "
            f"{pattern.value}"
        )
    check_layout(layout)
    if not isinstance(timeout, int | float) or not 0 < timeout <= 24 * 3600:
        raise InvalidOption(f"timeout={timeout!r} is not valid; expected seconds in (0, 86400]")
    mech = mechanism if isinstance(mechanism, Mechanism) else _build(mechanism, q_local, options)
    if isinstance(mechanism, Mechanism) and options:
        raise InvalidOption(f"options {sorted(options)} given with a built mechanism module; build it with them")
    if mech.spatial and 1 not in mech.spatial_dims:
        raise InvalidOption(
            f"{mech.name} attends on a 2-D/3-D grid, which context parallelism does not split; mechanisms with a "
            "1-D form (neighborhood along the sequence) can be split"
        )
    line = (q_local.shape[1],) if mech.spatial else None  # a spatial mechanism along the sequence axis: a 1-D grid
    x = validate(mech, q_local, k_local, v_local, pattern=pattern, scale=scale, key_padding_mask=key_padding_mask,
                 state=None, return_state=False, spatial_shape=line)  # fmt: skip
    if x.tq != x.tk:
        raise ShapeError(f"q_local has {x.tq} tokens but k_local has {x.tk}: a rank holds as many keys as queries")
    world = dist.get_world_size(group) if dist.is_initialized() else 1
    rank = dist.get_rank(group) if dist.is_initialized() else 0
    if world > 1:
        _check_same_sizes(x.q, x.k, x.v, group, world, float(timeout))
    total = x.tq * world
    check_length(total, world, layout)
    sizes = dict(layout=layout, world=world, total=total, heads=x.heads, kv_heads=x.kv_heads)
    chosen = choose(mech, pattern, strategy, **sizes)
    call = CPCall(
        q=x.q, k=x.k, v=x.v, mech=mech, pattern=pattern, scale=x.scale, key_padding_mask=x.key_padding_mask,
        group=group, world=world, rank=rank, layout=layout, total=total,
        positions=positions(total, world, rank, layout).to(x.q.device), timeout=float(timeout),
    )  # fmt: skip
    return chosen.run(call)


def _build(name: str, q: torch.Tensor, options: dict[str, Any]) -> Mechanism:
    return create(name, heads=q.shape[2], head_dim=q.shape[3], **options)


def _check_same_sizes(q, k, v, group, world: int, timeout: float) -> None:
    """Every rank must hold a shard of the same sizes (one small all-gather, waited for at most ``timeout``
    seconds like every collective here); else each rank names the culprits."""
    mine = torch.tensor([*q.shape, *k.shape, v.shape[-1]], dtype=torch.int64)
    flat = torch.empty(world * mine.numel(), dtype=torch.int64)
    collective(all_gather_flat, flat, mine, what="shard-size check", timeout=timeout, group=group)
    every = flat.view(world, -1)
    odd = [r for r in range(world) if not torch.equal(every[r], every[0])]
    if odd:
        raise ShapeError(
            f"ranks hold shards of different sizes: rank 0 has q, k {tuple(every[0, :4].tolist())}, "
            f"{tuple(every[0, 4:8].tolist())}; ranks {odd} differ. Every rank must hold T/W tokens of the same batch"
        )
