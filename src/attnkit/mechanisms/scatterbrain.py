"""Scatterbrain — Scatterbrain: Unifying Sparse and Low-rank Attention Approximation (Chen, Dao, Winsor, Song,
Rudra, Ré, 2021, arXiv:2110.15343).

A low-rank estimate of the whole attention matrix (Performer's positive random features, ``phi(q).phi(k)``
estimates ``exp(s)``) plus a sparse correction on the pairs an LSH puts in the same bucket, where the estimate
is replaced by the exact value:

    S_ij = exp(s_ij) - phi(q_i).phi(k_j)   for j in the sparse support of i (and 0 elsewhere)
    out_i = (phi(q_i)^T sum_j phi(k_j) v_j^T + sum_j S_ij v_j) / (phi(q_i) . sum_j phi(k_j) + sum_j S_ij)

with every sum over the keys the pattern lets query i see; ``s_ij = scale * q_i . k_j``.

Choices where the paper is vague or does not fit attnkit:
- Features as in ``performer``: ``phi(x) = exp(W x - |x|^2 / 2) / sqrt(m)``, ``x = sqrt(scale) * q``, ``W`` drawn
  once from ``seed`` (orthogonal Gaussian blocks, shared by all heads). The sparse support is LSH as in
  ``reformer``: a query and a key share a bucket in one of ``n_hashes`` rounds of angular LSH (rotations drawn
  from the same seed), a pair shared in several rounds counted once. Both are pure functions of the token and
  the seed: no causal leak, no dependence on the length.
- Safe denominator: the denominator equals ``sum_{j outside the support} phi(q_i).phi(k_j) + sum_{j in the
  support} exp(s_ij) > 0`` exactly, but is computed as the paper does, by subtraction, which rounding can push
  below 0. The low-rank remainder ``phi(q_i) . sum_j phi(k_j) - sum_{j in support} phi(q_i).phi(k_j)`` is
  clamped at 0 (its numerator is left as it is); a query whose denominator is then 0 (it sees no key) outputs 0.
- Stabilisation: every term of query i is computed relative to a per-query factor (the largest of its exact
  scores on the support and of its feature exponent), which cancels between numerator and denominator.
- Causal self: the low-rank sums are prefix sums (the chunked linear-attention scan) and the support keeps
  ``j <= i``. The decoding state is a KV cache (the features of cached keys are recomputed); causal_cross is
  query-independent by construction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..inputs import AttentionInputs
from ..mechanism import Complexity, Mechanism, Paper, Shape, fast_path, register_mechanism
from ..ops.bucketed import DEFAULT_BLOCK, PairFeatures, bucketed_partials, common_scale, group_predicate, round_weights
from ..ops.chunked import DEFAULT_CHUNK, causal_linear_scan
from ..ops.feature_maps import orthogonal_gaussian, positive_random_features
from ..ops.gqa import repeat_kv
from ..ops.lsh import query_key_buckets, random_rotations
from ..ops.masking import visibility
from ..ops.reference import compute_dtype, upcast_qkv
from ..options import MAX_SEED, InvalidOption, check_int
from ..patterns import ALL_PATTERNS, Pattern, dense_mask
from ..state import KVCache
from ._seeded import SeededDraws

ROTATION_SALT = 1  # the LSH rotations come from a draw independent of the features'


@dataclass(frozen=True)
class ScatterbrainOptions:
    num_features: int = 256  # m, Performer random features of the low-rank part
    n_buckets: int = 64  # LSH buckets per round of the sparse part (even); fixed, never derived from the length
    n_hashes: int = 1  # rounds of LSH; the sparse support is the union of the rounds' shared buckets
    seed: int | None = None  # features and rotations are drawn from this seed; None: a seed drawn at create
    chunk_size: int = DEFAULT_CHUNK  # tokens per chunk of the causal low-rank scan (speed only)
    block_size: int = DEFAULT_BLOCK  # slots per block of the sparse part (speed only)

    def __post_init__(self):
        check_int("scatterbrain", "num_features", self.num_features)
        check_int("scatterbrain", "n_buckets", self.n_buckets, minimum=2)
        if self.n_buckets % 2:
            raise InvalidOption(
                f"scatterbrain option n_buckets={self.n_buckets!r} is not valid; expected an even integer >= 2"
                " (angular LSH splits each rotation into +/- halves)"
            )
        check_int("scatterbrain", "n_hashes", self.n_hashes, maximum=64)
        if self.seed is not None:
            check_int("scatterbrain", "seed", self.seed, minimum=0, maximum=MAX_SEED)
        check_int("scatterbrain", "chunk_size", self.chunk_size)
        check_int("scatterbrain", "block_size", self.block_size, maximum=4096)


@dataclass(frozen=True)
class _Features:
    q: torch.Tensor  # [B, Tq, Hq, m]  phi(q) / exp(log_scale): entries <= 1 / sqrt(m)
    log_scale: torch.Tensor  # [B, Tq, Hq]  phi(q) = q * exp(log_scale)
    k: torch.Tensor  # [B, Tk, Hkv, m]  phi(k), 0 for padded keys


@register_mechanism("scatterbrain")
class Scatterbrain(SeededDraws, Mechanism):
    family = "low-rank + sparse"
    paper = Paper("Scatterbrain: Unifying Sparse and Low-rank Attention Approximation", 2021, "2110.15343")
    patterns = ALL_PATTERNS
    exact = False
    state_kind = KVCache
    complexity = Complexity(
        time="O(T·m·D + T·(n_hashes·T / n_buckets)·(D + m))", memory="O(T·(m + n_hashes·D)) + one chunk of tiles"
    )
    Options = ScatterbrainOptions
    # fp32: the fast path subtracts the features' estimate on the support from their full sum (the paper's form);
    # where the support holds every visible key that remainder is 0 up to rounding, and a gradient that is ~0
    # (a query seeing one key) keeps that rounding of exp features (|w| ~ sqrt(d)): up to 5e-5 of the floor
    tolerances = {**Mechanism.tolerances, torch.float32: 1e-4}
    example_options = (
        {"num_features": 16, "n_buckets": 4, "seed": 1},
        {"num_features": 32, "n_buckets": 8, "n_hashes": 2, "block_size": 4, "chunk_size": 16},
    )
    fidelity_knob = ("num_features", (64, 128, 256))

    # ---- random draws and features (shared by every path) ---------------------------------------------

    def projection(self, dim: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """``W [m, dim]`` of the features (drawn in fp64 on the CPU, then moved)."""
        make = lambda gen: orthogonal_gaussian(self.options.num_features, dim, self.draw_seed).to(device, dtype)  # noqa: E731
        return self.drawn(("W", dim, torch.device(device), dtype), make)

    def rotations(self, dim: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """``R [n_hashes, dim, n_buckets / 2]`` of the LSH."""
        o = self.options

        def make(gen: torch.Generator) -> torch.Tensor:  # its own generator: independent of the features' draw
            return random_rotations(self.generator(ROTATION_SALT), dim, o.n_hashes, o.n_buckets).to(device, dtype)

        return self.drawn(("R", dim, torch.device(device), dtype), make)

    def features(self, x: AttentionInputs) -> _Features:
        cdt = compute_dtype(x.q.dtype)
        w = self.projection(x.q.shape[-1], x.q.device, cdt)  # [m, D]
        root = math.sqrt(x.scale)  # phi(q).phi(k) estimates exp(scale q.k)
        xq = x.q.to(cdt) * root  # [B, Tq, Hq, D]
        logits = xq @ w.T  # [B, Tq, Hq, m]
        top = logits.amax(-1, keepdim=True).detach()  # a per-query shift; it comes back in log_scale
        fq = logits.sub(top + 0.5 * math.log(w.shape[0])).exp_()  # [B, Tq, Hq, m], entries <= 1 / sqrt(m)
        log_scale = top[..., 0] - 0.5 * xq.square().sum(-1)  # [B, Tq, Hq]
        fk = positive_random_features(x.k.to(cdt) * root, w, per_row_max=False)  # [B, Tk, Hkv, m]
        if x.key_padding_mask is not None:  # phi(0) is not 0: padded keys are taken out by selection
            fk = torch.where(x.key_padding_mask[:, :, None, None], fk, 0.0)
        return _Features(fq, log_scale, fk)

    def bucket_ids(self, x: AttentionInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """LSH bucket of every query and key per round: ``[B, Hq, R, Tq]``, ``[B, Hq, R, Tk]``."""
        return query_key_buckets(x.q, x.k, self.rotations(x.q.shape[-1], x.q.device, compute_dtype(x.q.dtype)))

    # ---- reference -----------------------------------------------------------------------------------

    def reference(self, x: AttentionInputs):
        q, k, v = upcast_qkv(x)  # [B, Tq, H, D], [B, Tk, H, D], [B, Tk, H, Dv]
        f = self.features(x)
        fk = repeat_kv(f.k, x.groups)  # [B, Tk, H, m]
        q_ids, k_ids = self.bucket_ids(x)
        dims = dict(q_offset=x.q_offset, batch=x.batch, heads=x.heads, device=x.q.device)
        visible = visibility(x)  # [B|1, H|1, Tq, Tk] or None
        support = dense_mask(group_predicate(q_ids, k_ids, x.q_offset), x.tq, x.tk, **dims)  # [B, H, Tq, Tk]
        support = support if visible is None else support & visible

        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * x.scale  # [B, H, Tq, Tk]
        log_scale = f.log_scale.transpose(1, 2)  # [B, H, Tq]
        # a factor per query, cancelling between numerator and denominator: keeps every term <= 1
        c = torch.maximum(scores.masked_fill(~support, float("-inf")).amax(-1), log_scale).detach()  # [B, H, Tq]
        low = torch.einsum("bqhf,bkhf->bhqk", f.q, fk) * torch.exp(log_scale - c)[..., None]  # phi(q_i).phi(k_j)
        low_seen = low if visible is None else torch.where(visible, low, 0.0)
        exact = torch.exp(scores.masked_fill(~support, float("-inf")) - c[..., None])  # exp(s_ij) on the support
        overlap = torch.where(support, low, 0.0)  # the low-rank estimate there, replaced by S_ij = exact - overlap
        den = (low_seen.sum(-1) - overlap.sum(-1)).clamp_min(0.0) + exact.sum(-1)  # the safe rule, [B, H, Tq]
        num = torch.einsum("bhqk,bkhd->bhqd", low_seen - overlap + exact, v)  # [B, H, Tq, Dv]
        out = torch.where(den[..., None] > 0, num / torch.where(den > 0, den, 1.0)[..., None], 0.0)
        return out.transpose(1, 2).to(x.q.dtype), None

    # ---- fast path -----------------------------------------------------------------------------------

    @fast_path("bucketed", priority=10)
    def bucketed(self, x: AttentionInputs):
        f = self.features(x)
        q_ids, k_ids = self.bucket_ids(x)
        num_lr, den_lr = self._low_rank(x, f)  # [B, Hq, Tq, Dv], [B, Hq, Tq], relative to exp(log_scale)
        sparse = bucketed_partials(
            x.q,
            x.k,
            x.v,
            q_ids,
            k_ids,
            n_groups=self.options.n_buckets,
            scale=x.scale,
            causal=x.pattern is Pattern.CAUSAL_SELF,
            q_offset=x.q_offset,
            key_padding_mask=x.key_padding_mask,
            block=self.options.block_size,
            features=PairFeatures(f.q, f.k, f.log_scale),
        )  # per round [R, B, Hq, Tq(, Dv)]
        log_scale = f.log_scale.transpose(1, 2)  # [B, Hq, Tq]
        top = common_scale(sparse.row_max, log_scale)
        w_low, w = torch.exp(log_scale - top), round_weights(sparse.row_max, top)  # [B, Hq, Tq], [R, B, Hq, Tq]
        # the low-rank remainder (keys outside the support), its normaliser clamped at 0: the safe rule
        rest_den = (w_low * den_lr - (w * sparse.feature_den).sum(0)).clamp_min(0.0)
        rest_num = w_low[..., None] * num_lr - (w[..., None] * sparse.feature_num).sum(0)
        den = rest_den + (w * sparse.den).sum(0)
        num = rest_num + (w[..., None] * sparse.num).sum(0)
        out = torch.where(den[..., None] > 0, num / torch.where(den > 0, den, 1.0)[..., None], 0.0)
        return out.transpose(1, 2).to(x.q.dtype), None

    def _low_rank(self, x: AttentionInputs, f: _Features) -> tuple[torch.Tensor, torch.Tensor]:
        """``phi~(q_i)^T sum_j phi(k_j) [v_j, 1]`` over the visible keys: numerators ``[B, Hq, Tq, Dv]`` and
        normalisers ``[B, Hq, Tq]`` (``phi~(q) = phi(q) / exp(log_scale)``)."""
        cdt = f.q.dtype
        v1 = torch.cat([x.v.to(cdt), x.v.new_ones(*x.v.shape[:3], 1, dtype=cdt)], dim=-1)  # [B, Tk, Hkv, Dv+1]
        if x.pattern is Pattern.CAUSAL_SELF:
            past = x.q_offset  # keys of a KV cache: all visible to every query of the call
            state = torch.einsum("bkhf,bkhd->bhfd", f.k[:, :past], v1[:, :past]) if past else None
            out, _ = causal_linear_scan(f.q, f.k[:, past:], v1[:, past:], state, chunk=self.options.chunk_size)
        else:
            state = repeat_kv(torch.einsum("bkhf,bkhd->bfhd", f.k, v1), x.groups)  # [B, m, Hq, Dv+1]
            out = torch.einsum("bqhf,bfhd->bqhd", f.q, state)  # [B, Tq, Hq, Dv+1]
        out = out.transpose(1, 2)  # [B, Hq, Tq, Dv+1]
        return out[..., :-1], out[..., -1]

    # ---- costs ---------------------------------------------------------------------------------------

    def flops(self, shape: Shape, pattern: Pattern) -> float:
        o = self.options
        m, d, dv = o.num_features, shape.dk, shape.dv
        rows = shape.tq * shape.heads + shape.tk * shape.kv_heads
        maps = 2.0 * rows * d * (m + o.n_hashes * o.n_buckets / 2)  # features and LSH rotations
        low_rank = 2.0 * m * (dv + 1) * (shape.tk * shape.kv_heads + shape.tq * shape.heads)
        share = 1.0 - (1.0 - 1.0 / o.n_buckets) ** o.n_hashes  # expected support under uniform buckets
        keys = share * shape.tk * (0.5 if pattern is Pattern.CAUSAL_SELF else 1.0)
        sparse = 2.0 * shape.heads * shape.tq * keys * (d + m + 2 * dv)  # scores, estimates, two products with v
        return shape.batch * (maps + low_rank + sparse)
