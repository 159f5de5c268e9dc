"""Adapters of the peers that approximate attention: performer-pytorch, reformer-pytorch, routing-transformer
(kernel level) and nystrom-attention, linformer, agent-attention-pytorch (module level, with projections).
What each is set up to match is said in ``peer_adapters``' docstring."""

from __future__ import annotations

import contextlib
import io
import logging

import torch

from ..patterns import as_pattern
from .case import BenchCase as Case
from .peer_common import CS, Forward, _bh, _bhtd, _module, _opt, _tokens

log = logging.getLogger(__name__)


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
