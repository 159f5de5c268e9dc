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

FLOPs count forward multiply-adds x2 (the worker's x3.5 for forward+backward): exact peers use the
counterpart's count of visible (query, key) pairs; approximations a rough count of their own matmuls,
module-level ones with their projections. Options of counterparts not yet in attnkit are provisional
names: align them with the mechanisms when those land.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..api import create
from ..patterns import as_pattern, causal, window
from .case import BENCH_OPTIONS
from .case import BenchCase as Case  # a speed.Case: its fields (peer, options, tq...) are read here

log = logging.getLogger(__name__)

NS, CS, NC, CC = "noncausal_self", "causal_self", "noncausal_cross", "causal_cross"
KERNEL, MODULE = "kernel level (takes q, k, v)", "module-level (includes projections)"
Forward = Callable[[], torch.Tensor]


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


def _opt(case: Case, name: str) -> Any:
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


# ---- approximations, kernel level -----------------------------------------------------------------


def _performer_build(case: Case, q, k, v, grad: bool) -> Forward:
    from performer_pytorch import FastAttention

    with contextlib.redirect_stdout(io.StringIO()) as said:  # it prints when the CUDA causal kernel is missing
        fa = FastAttention(case.head_dim, nb_features=_opt(case, "num_features"), causal=case.pattern == CS)
    if said.getvalue().strip():
        log.info("performer-pytorch: %s", said.getvalue().strip())
    m = _module(fa, q)
    qh, kh, vh = (_bhtd(t, grad) for t in (q, k, v))
    return lambda: m(qh, kh, vh)


def _performer_flops(case: Case) -> float:
    f, d = _opt(case, "num_features"), case.head_dim
    # feature maps of q and k, then phi(K)^T V, phi(Q) (phi(K)^T V) and the normaliser phi(Q) . sum phi(K)
    per_head = 2.0 * f * (d * (case.tq + case.tk) + d * (case.tq + case.tk) + case.tq)
    return _bh(case) * per_head


def _reformer_build(case: Case, q, k, v, grad: bool) -> Forward:
    from reformer_pytorch.reformer_pytorch import LSHAttention

    m = _module(
        LSHAttention(bucket_size=_opt(case, "bucket_size"), n_hashes=_opt(case, "n_hashes"), causal=case.pattern == CS),
        q,
    )
    b, n, h, d = q.shape
    # shared QK: the queries are also the keys (normalised inside); k is not used. [B*H, T, D]
    qk = _bhtd(q, grad).reshape(b * h, n, d)
    vv = _bhtd(v, grad).reshape(b * h, n, d)
    return lambda: m(qk, vv)[0]


def _reformer_flops(case: Case) -> float:
    bs, nh, t, d = _opt(case, "bucket_size"), _opt(case, "n_hashes"), case.tk, case.head_dim
    hashing = 2.0 * t * d * nh * (t // bs) / 2  # rotations to n_buckets / 2 per round
    attend = 2.0 * nh * t * (2 * bs) * (2 * d)  # each chunk of bs queries sees its chunk and the one before
    return _bh(case) * (hashing + attend)


def _reformer_check(case: Case) -> str | None:
    bs = _opt(case, "bucket_size")
    return None if case.tk % (2 * bs) == 0 else f"reformer-pytorch needs T % (2 * bucket_size={bs}) == 0"


def _routing_sizes(case: Case) -> tuple[int, int]:
    clusters = max(1, min(_opt(case, "num_clusters"), case.tk))
    return clusters, case.tk // clusters  # clusters, tokens per cluster (the peer's window)


def _routing_build(case: Case, q, k, v, grad: bool) -> Forward:
    from routing_transformer.routing_transformer import KmeansAttention

    nc, w = _routing_sizes(case)
    m = KmeansAttention(nc, w, case.heads, case.head_dim, causal=case.pattern == CS)
    m = _module(m, q)
    qh, kh, vh = (_bhtd(t, grad) for t in (q, k, v))
    m.kmeans.init(torch.cat((qh, kh), dim=2).detach())  # k-means initialisation (10 rounds): not timed
    return lambda: m(qh, kh, vh)[0]


def _routing_flops(case: Case) -> float:
    (nc, w), d = _routing_sizes(case), case.head_dim
    mem = 1 if case.pattern == CS else 0  # a learned memory key per cluster in causal mode
    return _bh(case) * (2.0 * 2 * case.tk * nc * d + 2.0 * nc * w * (w + mem) * 2 * d)


# ---- approximations, module level (x [B,T,H*D], own projections) ----------------------------------


def _nystrom_build(case: Case, q, k, v, grad: bool) -> Forward:
    from nystrom_attention import NystromAttention

    m = NystromAttention(
        dim=case.heads * case.head_dim,
        dim_head=case.head_dim,
        heads=case.heads,
        num_landmarks=_opt(case, "num_landmarks"),
        pinv_iterations=6,
        residual=False,
    )
    m, x = _module(m, q), _tokens(q, grad)
    return lambda: m(x)


def _nystrom_flops(case: Case) -> float:
    mm, t, d, dim = _opt(case, "num_landmarks"), case.tk, case.head_dim, case.heads * case.head_dim
    t = -(-t // mm) * mm  # padded to a multiple of the landmark count
    core = 2.0 * (4 * t * mm * d + mm * mm * d + t * mm * mm + 6 * 4 * mm**3)  # 3 sims, 6-step pinv, 3 products
    return _bh(case) * core + 2.0 * case.batch * t * dim * 4 * dim  # + qkv and output projections


def _nystrom_check(case: Case) -> str | None:
    # its iterative pseudo-inverse mixes a float32 identity into the landmark matmuls
    return None if case.dtype == "float32" else "nystrom-attention runs only in float32 (float32 identity in its pinv)"


def _linformer_build(case: Case, q, k, v, grad: bool) -> Forward:
    from linformer import LinformerSelfAttention

    m = LinformerSelfAttention(
        dim=case.heads * case.head_dim,
        seq_len=case.tk,
        k=_opt(case, "proj_len"),
        heads=case.heads,
        dim_head=case.head_dim,
    )
    m, x = _module(m, q), _tokens(q, grad)
    if as_pattern(case.pattern).is_self:
        return lambda: m(x)
    ctx = _tokens(k, grad)  # the cross context; the module projects it to keys and values itself
    return lambda: m(x, context=ctx)


def _linformer_flops(case: Case) -> float:
    kp, dim = _opt(case, "proj_len"), case.heads * case.head_dim
    proj = 2.0 * case.batch * dim * (dim * (2 * case.tq + 2 * case.tk) + 2 * case.tk * kp)  # q,out; k,v; E,F
    return proj + 2.0 * _bh(case) * case.tq * kp * 2 * case.head_dim


def _agent_build(case: Case, q, k, v, grad: bool) -> Forward:
    from agent_attention_pytorch import AgentSelfAttention

    m = AgentSelfAttention(
        case.heads * case.head_dim,
        num_agent_tokens=_opt(case, "num_agents"),
        dim_head=case.head_dim,
        heads=case.heads,
        talking_heads=False,
        gate=False,
    )
    m, x = _module(m, q), _tokens(q, grad)
    return lambda: m(x)


def _agent_flops(case: Case) -> float:
    a, t, dim = _opt(case, "num_agents"), case.tk, case.heads * case.head_dim
    return 2.0 * _bh(case) * 4 * t * a * case.head_dim + 2.0 * case.batch * t * dim * 4 * dim


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
