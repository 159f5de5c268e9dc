"""Autograd-safe collectives for the context-parallel strategies (research/C_kernels_distributed.md §3.6, §7).

- :func:`all_gather` — every rank's tensor stacked ``[W, *shape]``; its backward is the adjoint, a reduce-scatter
  of the incoming gradient (sum over ranks of the gradient for my slice). Written as an ``autograd.Function``
  because the deprecated ``torch.distributed.nn.functional.all_gather`` gives wrong gradients on gloo when the
  incoming gradient is not contiguous.
- :func:`exchange` — one point-to-point hop each way along the rank line: rank r sends ``to_next`` to r+1 and
  ``to_prev`` to r-1 and receives theirs; the backward sends the gradients back the same way.

gloo takes only the flat (concatenated) output layout for all-gather and reduce-scatter, so buffers are allocated
``[W * numel]`` and viewed afterwards. Every wait is bounded by ``timeout`` seconds, so a rank that died or hangs
turns into an error on the others. ``CommDebugMode`` counts the all-gather and reduce-scatter but not point-to-point
calls: :data:`P2P_CALLS` counts each ``batch_isend_irecv`` made here (tests assert on it).
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.distributed as dist

from . import faults

P2P_CALLS: Counter[str] = Counter()  # "forward" / "backward": batch_isend_irecv calls made by exchange()


def all_gather_flat(output: torch.Tensor, tensor: torch.Tensor, **kwargs):
    """``dist.all_gather_single`` (torch >= 2.13; the old ``all_gather_into_tensor`` warns there, and older torch has
    only that one), looked up at call time so that wrappers (the benchmark's traffic count) see the call. gloo
    takes a flat ``[W * n]`` output only."""
    return getattr(dist, "all_gather_single", dist.all_gather_into_tensor)(output, tensor, **kwargs)


def reduce_scatter_flat(output: torch.Tensor, tensor: torch.Tensor, **kwargs):
    """``dist.reduce_scatter_single`` (or the older ``reduce_scatter_tensor``), looked up at call time."""
    return getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)(output, tensor, **kwargs)


def _wait(work, timeout: float, what: str = "a collective") -> None:
    if work is not None:
        faults.wait(work, what=what, timeout=timeout)


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group, world: int, timeout: float) -> torch.Tensor:
        ctx.group, ctx.world, ctx.timeout = group, world, timeout
        mine = x.contiguous()
        flat = torch.empty(world * mine.numel(), dtype=mine.dtype, device=mine.device)  # gloo: flat output only
        _wait(all_gather_flat(flat, mine.view(-1), group=group, async_op=True), timeout)
        return flat.view(world, *x.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()  # [W, *shape]; non-contiguous gradients are what broke the deprecated op
        mine = torch.empty(grad[0].numel(), dtype=grad.dtype, device=grad.device)
        _wait(reduce_scatter_flat(mine, grad.view(-1), group=ctx.group, async_op=True), ctx.timeout)
        return mine.view(grad.shape[1:]), None, None, None


def tie(out: torch.Tensor, *received: torch.Tensor) -> torch.Tensor:
    """``out`` joined (with weight 0) to what a collective returned. Every rank must run the backward of every
    collective, or the ranks that do wait for one that never comes (or, for P2P, silently miss its gradients):
    a rank whose output happens not to use what it received (rank 0 of a causal prefix) ties it in."""
    for t in received:
        out = out + 0 * t.sum()
    return out


def all_gather(x: torch.Tensor, group, world: int, timeout: float) -> torch.Tensor:
    """``[W, *x.shape]``: rank p's ``x`` at index p, differentiable (backward: one reduce-scatter)."""
    if world == 1:
        return x[None]
    return _AllGather.apply(x, group, world, timeout)


def every_rank(value: int, group, world: int, timeout: float) -> list[int]:
    """Every rank's ``value`` (an int64 all-gather, no gradient): to check that ranks agree on something."""
    mine = torch.tensor([value], dtype=torch.int64)
    flat = torch.empty(world, dtype=torch.int64)
    _wait(all_gather_flat(flat, mine, group=group, async_op=True), timeout)
    return flat.tolist()


def _send_recv(to_prev, to_next, like: torch.Tensor, group, rank: int, world: int, timeout: float, phase: str):
    """Send ``to_prev`` to rank-1 and ``to_next`` to rank+1 (None: that direction is not used, on every rank).
    Returns ``(from_prev, from_next)``: what rank-1 sent to its next and rank+1 to its prev (zeros at the ends of
    the line or for a direction not used), each shaped like ``like``."""
    ops = []
    from_prev, from_next = torch.zeros_like(like), torch.zeros_like(like)
    peer = lambda r: dist.get_global_rank(group, r) if group is not None else r  # noqa: E731
    if rank > 0 and to_next is not None:  # rank-1 sends me its to_next
        ops.append(dist.P2POp(dist.irecv, from_prev, peer(rank - 1), group))
    if rank > 0 and to_prev is not None:
        ops.append(dist.P2POp(dist.isend, to_prev.contiguous(), peer(rank - 1), group))
    if rank < world - 1 and to_prev is not None:  # rank+1 sends me its to_prev
        ops.append(dist.P2POp(dist.irecv, from_next, peer(rank + 1), group))
    if rank < world - 1 and to_next is not None:
        ops.append(dist.P2POp(dist.isend, to_next.contiguous(), peer(rank + 1), group))
    if ops:
        P2P_CALLS[phase] += 1
        for work in dist.batch_isend_irecv(ops):
            _wait(work, timeout)
    return from_prev, from_next


class _Exchange(torch.autograd.Function):
    """Forward: ``(to_prev, to_next) -> (from_prev, from_next)``. Backward: the gradient of ``from_prev`` goes back
    to rank-1 (it is the gradient of that rank's ``to_next``), the gradient of ``from_next`` to rank+1."""

    @staticmethod
    def forward(ctx, to_prev, to_next, group, rank: int, world: int, timeout: float, both: bool):
        ctx.args = (group, rank, world, timeout)
        ctx.both = both
        return _send_recv(to_prev if both else None, to_next, to_next, group, rank, world, timeout, "forward")

    @staticmethod
    def backward(ctx, grad_prev, grad_next):
        group, rank, world, timeout = ctx.args
        # my from_prev was rank-1's to_next: its gradient goes back to rank-1, which gets it as "from next"
        d_to_prev, d_to_next = _send_recv(
            grad_prev.contiguous(), grad_next.contiguous() if ctx.both else None, grad_prev, group, rank, world,
            timeout, "backward",
        )  # fmt: skip
        return d_to_prev, d_to_next, None, None, None, None, None


def exchange(to_prev: torch.Tensor | None, to_next: torch.Tensor, group, rank: int, world: int, timeout: float):
    """One hop each way along ranks 0..W-1 (no wrap-around): ``(from_prev, from_next)``, zeros at the ends.

    ``to_next`` goes to rank+1 (the tail the next rank needs); ``to_prev`` (same shape; None on every rank: nothing
    goes back) to rank-1. Differentiable: gradients return to the sender. One ``batch_isend_irecv`` forward, one
    backward (none when W = 1).
    """
    both = to_prev is not None
    if world == 1:
        return torch.zeros_like(to_next), torch.zeros_like(to_next)
    return _Exchange.apply(to_prev if both else torch.zeros_like(to_next), to_next, group, rank, world, timeout, both)
