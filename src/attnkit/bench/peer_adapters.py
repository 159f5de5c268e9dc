"""Peer adapters: how each peer package is built and called to match its attnkit counterpart.

Each adapter maps a peer (a PyPI package, or FlexAttention from torch) to its attnkit counterpart and
is set up to compute the same thing where that is possible:

- ``local-attention`` equals ``sliding_window`` exactly (W = window): ``window_size=W-1``,
  ``exact_windowsize=True`` (it keeps ``|i-j| <= window_size``), ``look_backward=1``, ``look_forward=0|1``,
  ``autopad=True``, plus a key mask in noncausal mode to hide autopad's zero keys. Its usual setting
  (``window_size=W``, not exact) sees whole blocks instead: W to 2W keys (noncausal up to 3W).
- ``flex-attention`` (softmax) / ``flex-attention-window`` (sliding_window) / ``flex-attention-block-sparse``
  (block_sparse) / ``flex-attention-dilated`` (dilated) / ``flex-attention-neighborhood`` (neighborhood) /
  ``flex-attention-swin-window`` (window):
  exact, with attnkit's own mask predicates (the mechanism's ``mask_predicate``, random-block draw captured
  as a tensor; a fixed seed so both draw alike). On CPU it runs only compiled, forward only; it is compiled
  while being built. ``flex-attention-neighborhood`` runs on the case's square image (``case.spatial_shape``,
  64 x 64 at T = 4096), as attnkit's own spatial cases do; other lengths are left out.
- ``performer-pytorch``: ``FastAttention`` (FAVOR+); causal without the CUDA extension is the package's
  chunked prefix-sum fallback. Its key stabiliser is a max over all keys, also when causal (cancels).
- ``reformer-pytorch``: ``LSHAttention`` is shared-QK (keys = normalised queries, ``k`` unused; a token
  sees itself only when nothing else is visible) and attends within sorted chunks of ``bucket_size``; needs
  T % (2 * bucket_size) == 0. Its buckets per round are T / bucket_size: attnkit's ``reformer`` takes
  ``n_buckets`` as a fixed option instead (the benchmark gives it T / 64 at T = 8192, see ``BENCH_OPTIONS``).
- ``routing-transformer``: ``KmeansAttention`` with attnkit's option ``num_clusters`` (its window, the
  tokens per cluster, is T // num_clusters), centroids initialised by k-means while building; eval mode, so
  the training-time EMA centroid update is not timed.
- module-level (includes projections): ``nystrom-attention`` (no conv residual; float32 only),
  ``linformer`` (``seq_len`` = Tk) and ``agent-attention-pytorch`` (*learned* agent tokens where the
  paper pools queries; no talking heads, no gate) take ``x = q.reshape(B,T,H*D)`` and project it.

The approximations' builders live in ``peer_approx``, the small helpers every adapter uses in ``peer_common``;
this module holds the exact peers (local-attention, FlexAttention with attnkit's mask predicates) and ``PEERS``.

FLOPs count forward multiply-adds x2 (the worker's x3.5 for forward+backward): exact peers use the
counterpart's count of visible (query, key) pairs; approximations a rough count of their own matmuls,
module-level ones with their projections. Options of counterparts not yet in attnkit are provisional
names: align them with the mechanisms when those land.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..api import create
from ..patterns import as_pattern, causal, window
from .case import BENCH_OPTIONS
from .case import BenchCase as Case  # a speed.Case: its fields (peer, options, tq...) are read here
from .peer_approx import (
    _agent_build,
    _agent_flops,
    _linformer_build,
    _linformer_flops,
    _nystrom_build,
    _nystrom_check,
    _nystrom_flops,
    _performer_build,
    _performer_flops,
    _reformer_build,
    _reformer_check,
    _reformer_flops,
    _routing_build,
    _routing_flops,
)
from .peer_common import CC, CS, NC, NS, Forward, _bhtd, _module, _opt

log = logging.getLogger(__name__)

KERNEL, MODULE = "kernel level (takes q, k, v)", "module-level (includes projections)"


@dataclass(frozen=True)
class PeerSpec:
    package: str  # on PyPI
    module: str  # what to import
    mechanism: str  # the attnkit counterpart (pairs the two in the report)
    patterns: frozenset[str]
    level: str  # KERNEL or MODULE
    build: Callable[[Case, torch.Tensor, torch.Tensor, torch.Tensor, bool], Forward]
    flops: Callable[[Case], float]  # forward FLOPs of one call
    options: dict[str, Any] = field(default_factory=dict)  # the counterpart's options it is set up to match
    cpu_fwd_only: bool = False  # FlexAttention has no CPU backward
    check: Callable[[Case], str | None] = lambda case: None  # why a case cannot run, or None


# ---- exact peers ----------------------------------------------------------------------------------


def _local_build(case: Case, q, k, v, grad: bool) -> Forward:
    from local_attention import LocalAttention

    w, is_causal = _opt(case, "window"), case.pattern == CS
    # exact_windowsize keeps |i - j| <= window_size (causal: 0 <= i - j <= window_size): W - 1
    m = _module(
        LocalAttention(
            window_size=w - 1,
            causal=is_causal,
            look_backward=1,
            look_forward=int(not is_causal),
            exact_windowsize=True,
            autopad=True,
        ),
        q,
    )
    qh, kh, vh = (_bhtd(t, grad) for t in (q, k, v))
    # autopad appends zero keys; causal masking hides them, noncausal needs the key mask
    pad = not is_causal and case.tk % (w - 1) != 0
    mask = torch.ones(case.batch, case.tk, dtype=torch.bool, device=q.device) if pad else None
    return lambda: m(qh, kh, vh, mask=mask)


def _counterpart_flops(case: Case) -> float:
    """An exact peer does the work of its attnkit counterpart: the counterpart's own count."""
    mech = create(case.mechanism, heads=case.heads, head_dim=case.head_dim, **case.options)
    return mech.flops(case.shape(), as_pattern(case.pattern))


def _square_check(case: Case) -> str | None:
    return None if case.spatial_shape else f"runs on a square image; Tq={case.tq} is not a square"


def _window_check(case: Case) -> str | None:
    return None if _opt(case, "window") >= 2 else "needs window >= 2 (local-attention's window_size is window - 1)"


def _flex_build(case: Case, q, k, v, grad: bool) -> Forward:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    heads = None  # the predicate does not read the head
    if case.mechanism == "sliding_window":
        pred = window(_opt(case, "window"), causal=case.pattern == CS)
    elif case.mechanism in _FLEX_LAYOUTS:
        mech = create(case.mechanism, heads=case.heads, head_dim=case.head_dim, **case.options)
        pred = mech.mask_predicate(case.pattern, case.tk)  # causality included where the pattern has it
        heads = case.heads if mech.head_dependent() else None
    elif case.mechanism == "neighborhood":
        mech = create("neighborhood", **case.options)
        pred = mech.mask_predicate(case.pattern, case.spatial_shape)  # causal_self: causal along the rows
    elif case.mechanism == "window":
        pred = create("window", **case.options).mask_predicate(case.spatial_shape)  # noncausal only
    else:
        pred = causal if case.pattern == CS else None  # causal_cross restricts no key for softmax
    block_mask = None
    if pred is not None:
        block_mask = create_block_mask(pred, B=None, H=heads, Q_LEN=case.tq, KV_LEN=case.tk, device=q.device)
    # no eager fallback: uncompiled flex_attention materialises the scores, which is not what we time
    compiled = torch.compile(flex_attention, dynamic=False, fullgraph=True)
    qh, kh, vh = (_bhtd(t, grad) for t in (q, k, v))

    def forward() -> torch.Tensor:
        return compiled(qh, kh, vh, block_mask=block_mask)

    # The worker builds one adapter per process; a long-lived process (tests, notebooks) adds one dynamo
    # cache entry per shape, mask and dtype, so lift dynamo's recompile limit (8) for this warm-up.
    cfg = torch._dynamo.config
    limit = next(n for n in ("recompile_limit", "cache_size_limit") if hasattr(cfg, n))  # torch >= 2.6 | older
    try:  # compile (forward, and backward where timed) now, so that compile time is not measured
        with cfg.patch(**{limit: max(getattr(cfg, limit), 256)}), torch.set_grad_enabled(grad):
            out = forward()
            if grad:
                out.backward(torch.ones_like(out))
    except Exception as err:
        raise RuntimeError(
            f"FlexAttention does not run compiled on {q.device} ({case.dtype}, {case.mode}):"
            f" {type(err).__name__}: {err}"
        ) from err
    for t in (qh, kh, vh):
        t.grad = None
    return forward


_WINDOW = dict(BENCH_OPTIONS.get("sliding_window", {"window": 256}))
_FLEX_LAYOUTS = ("block_sparse", "dilated")  # mechanisms whose FlexAttention peer takes their mask_predicate
_BLOCK_SPARSE = dict(BENCH_OPTIONS.get("block_sparse", {"seed": 0}))
_DILATED = dict(BENCH_OPTIONS.get("dilated", {}))
_NEIGHBORHOOD = dict(BENCH_OPTIONS.get("neighborhood", {"kernel_size": 7}))
PEERS: dict[str, PeerSpec] = {
    "local-attention": PeerSpec(
        "local-attention",
        "local_attention",
        "sliding_window",
        frozenset({NS, CS}),
        KERNEL,
        _local_build,
        _counterpart_flops,
        _WINDOW,
        check=_window_check,
    ),
    "flex-attention": PeerSpec(
        "torch",
        "torch.nn.attention.flex_attention",
        "softmax",
        frozenset({NS, CS, NC, CC}),
        KERNEL,
        _flex_build,
        _counterpart_flops,
        dict(BENCH_OPTIONS.get("softmax", {})),
        cpu_fwd_only=True,
    ),
    "flex-attention-window": PeerSpec(
        "torch",
        "torch.nn.attention.flex_attention",
        "sliding_window",
        frozenset({NS, CS}),
        KERNEL,
        _flex_build,
        _counterpart_flops,
        _WINDOW,
        cpu_fwd_only=True,
        check=_window_check,
    ),
    "flex-attention-block-sparse": PeerSpec(
        "torch",
        "torch.nn.attention.flex_attention",
        "block_sparse",
        frozenset({NS, CS, NC, CC}),
        KERNEL,
        _flex_build,
        _counterpart_flops,
        _BLOCK_SPARSE,
        cpu_fwd_only=True,
    ),
    "flex-attention-dilated": PeerSpec(
        "torch",
        "torch.nn.attention.flex_attention",
        "dilated",
        frozenset({NS, CS}),
        KERNEL,
        _flex_build,
        _counterpart_flops,
        _DILATED,
        cpu_fwd_only=True,
    ),
    "flex-attention-neighborhood": PeerSpec(
        "torch",
        "torch.nn.attention.flex_attention",
        "neighborhood",
        frozenset({NS, CS}),
        KERNEL,
        _flex_build,
        _counterpart_flops,
        _NEIGHBORHOOD,
        cpu_fwd_only=True,
        check=_square_check,
    ),
    "flex-attention-swin-window": PeerSpec(
        "torch",
        "torch.nn.attention.flex_attention",
        "window",
        frozenset({NS}),
        KERNEL,
        _flex_build,
        _counterpart_flops,
        dict(BENCH_OPTIONS.get("window", {"window_size": 7})),
        cpu_fwd_only=True,
        check=_square_check,
    ),
    # FAVOR+ is query-independent without causal masking, so causal_cross is noncausal_cross's computation
    "performer-pytorch": PeerSpec(
        "performer-pytorch",
        "performer_pytorch",
        "performer",
        frozenset({NS, CS, NC, CC}),
        KERNEL,
        _performer_build,
        _performer_flops,
        {"num_features": 256},
    ),
    "reformer-pytorch": PeerSpec(
        "reformer-pytorch",
        "reformer_pytorch",
        "reformer",
        frozenset({NS, CS}),
        KERNEL,
        _reformer_build,
        _reformer_flops,
        {"bucket_size": 64, "n_hashes": 4},
        check=_reformer_check,
    ),
    "routing-transformer": PeerSpec(
        "routing-transformer",
        "routing_transformer",
        "routing",
        frozenset({NS, CS}),
        KERNEL,
        _routing_build,
        _routing_flops,
        {"num_clusters": 64},
    ),
    "nystrom-attention": PeerSpec(
        "nystrom-attention",
        "nystrom_attention",
        "nystrom",
        frozenset({NS}),
        MODULE,
        _nystrom_build,
        _nystrom_flops,
        {"num_landmarks": 64},
        check=_nystrom_check,
    ),
    "linformer": PeerSpec(
        "linformer",
        "linformer",
        "linformer",
        frozenset({NS, NC, CC}),
        MODULE,
        _linformer_build,
        _linformer_flops,
        {"proj_len": 256},
    ),
    "agent-attention-pytorch": PeerSpec(
        "agent-attention-pytorch",
        "agent_attention_pytorch",
        "agent",
        frozenset({NS}),
        MODULE,
        _agent_build,
        _agent_flops,
        {"num_agents": 64},
    ),
}
