"""Gaussian adaptive attention — Gaussian Adaptive Attention is All You Need: Robust Contextual
Representations Across Multiple Modalities (Ioannides et al., 2024, arXiv:2401.11143), GAAM on the scores.

GAAM normalises x along an axis with the data's own mean and variance and re-weights it by a Gaussian
with a learned mean offset delta and a learned scaled variance xi = c^2, per head:
    mu, sigma^2 = mean, variance of x;  x_norm = (x - (mu + delta)) / sqrt(sigma^2 + eps);  G = exp(-x_norm^2 / (2 xi))
Here x is a query's row of scores s_ij = scale q_i . k_j over the keys it sees (mu_i, sigma_i^2 are that
row's statistics), and G re-weights dot-product attention:
    p_ij = softmax_j(s_ij) G_ij / sum_j' softmax_j'(s_ij') G_ij' = softmax_j(s_ij - x_norm_ij^2 / (2 xi_h))
One Gaussian per head (the paper mixes several; the log of a mixture is no longer quadratic in s).

Statistics run over the keys the query sees (pattern and padding), so causal rows use only past keys:
no output depends on a later token or on the length of the call, and a KV cache reproduces them. The
``blocked`` path gets each row's mean and variance in closed form (sums of k and k k^T: O(T·D^2)) and
runs softmax over the logits, quadratic in s, in tiles with a recomputing backward: no T x T tensor
(``ops/_gaussian.py``). Calls of at most 16 queries (decoding) compute their few score rows once instead.
The logits cannot be an SDPA bias: the (s - m)^2 term needs every score, so no fused kernel applies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ShapeError
from ..inputs import AttentionInputs
from ..mechanism import Complexity, Mechanism, Paper, Shape, fast_path, register_mechanism
from ..ops._gaussian import causal_moments, quadratic_logit_attention
from ..ops.flops import causal_factor
from ..ops.gqa import repeat_kv
from ..ops.masking import masked_softmax, visibility, visible_counts
from ..ops.reference import compute_dtype, upcast_qkv
from ..options import check_float
from ..patterns import ALL_PATTERNS, Pattern
from ..state import KVCache

LOG2E = math.log2(math.e)
DIRECT_MAX_QUERIES = 16  # calls with at most this many queries (decoding) take the scores in one piece


@dataclass(frozen=True)
class GaussianOptions:
    init_offset: float = 0.0  # delta_h at init: the Gaussian's centre, mu + delta, in score units
    init_scale: float = 2.0  # c_h at init (xi_h = c_h^2 scales the row variance; the paper's code starts at 2)
    eps: float = 1e-8  # added to the row variance before dividing

    def __post_init__(self):
        # outside these ranges (x_norm - delta / sqrt(eps))^2 / (2 c^2) or 2 c^2 (var + eps) leave fp32's range,
        # and every weight of a row is -inf or NaN: all outputs NaN
        check_float("gaussian", "init_offset", self.init_offset, within=(-1e4, 1e4))
        check_float("gaussian", "init_scale", self.init_scale, within=(1e-6, 1e6))
        check_float("gaussian", "eps", self.eps, within=(1e-12, 1e4))


@register_mechanism("gaussian")
class Gaussian(Mechanism):
    family = "softmax variant"
    paper = Paper(
        "Gaussian Adaptive Attention is All You Need: Robust Contextual Representations Across Multiple Modalities",
        2024,
        "2401.11143",
    )
    patterns = ALL_PATTERNS
    exact = False
    trainable = True
    state_kind = KVCache
    complexity = Complexity(time="O(Tq·Tk·D + T·D²)", memory="O(Tq + Tk) blocked (reference: O(Tq·Tk))")
    Options = GaussianOptions
    example_options = ({"init_offset": 0.5},)

    def __init__(self, heads: int | None = None, head_dim: int | None = None, **options):
        super().__init__(heads, head_dim, **options)
        self.offset = nn.Parameter(torch.full((heads,), float(self.options.init_offset)))  # delta_h
        self.spread = nn.Parameter(torch.full((heads,), float(self.options.init_scale)))  # c_h, xi_h = c_h^2

    def check_call(self, x: AttentionInputs) -> None:
        super().check_call(x)
        if x.q.shape[-1] != self.head_dim:
            raise ShapeError(f"gaussian was created for head_dim={self.head_dim}; got q with head dim {x.q.shape[-1]}")

    # ---- the specification -------------------------------------------------------------------------

    def reference(self, x: AttentionInputs):
        q, k, v = upcast_qkv(x)  # [B, T, H, D], k and v repeated to the query heads
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * x.scale  # [B, H, Tq, Tk]
        probs = self.gaussian_weights(scores, visibility(x))
        out = torch.einsum("bhqk,bkhd->bqhd", probs, v)  # [B, Tq, H, Dv]
        return out.to(x.q.dtype), None

    def gaussian_weights(self, scores: torch.Tensor, seen: torch.Tensor | None) -> torch.Tensor:
        """The attention weights from written-out scores ``[B, H, Tq, Tk]`` (``seen``: visibility or None)."""
        w = torch.ones_like(scores[:1, :1]) if seen is None else seen.to(scores.dtype)
        n = w.sum(-1, keepdim=True).clamp(min=1)  # keys each query sees
        mu = (scores * w).sum(-1, keepdim=True) / n  # [B, H, Tq, 1]
        var = ((scores - mu).square() * w).sum(-1, keepdim=True) / n  # population variance of the row
        delta = self.offset.to(scores.dtype)[:, None, None]  # [H, 1, 1]
        xi = self.spread.to(scores.dtype).square()[:, None, None]
        x_norm = (scores - (mu + delta)) / torch.sqrt(var + self.options.eps)
        log_gauss = -x_norm.square() / (2 * xi)  # log G
        return masked_softmax(scores + log_gauss, seen)  # softmax(s) * G, renormalised

    # ---- fast path ---------------------------------------------------------------------------------

    def _row_stats(self, x: AttentionInputs, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance ``[B*H, Tq]`` of each query's scores over the keys it sees, in closed form
        (``q [B*H, Tq, D]``, ``k [B*H, Tk, D]`` heads first)."""
        b, h = x.batch, x.heads
        # moments of the scores shifted by the first key's score s_i0 = scale q_i.k_0 (the variance does not
        # change): with keys close to each other, E[s^2] - E[s]^2 unshifted would cancel to noise. k_0 is the
        # same key for every call of a sequence (a cache keeps it), so chunked calls agree with a full one.
        k0 = k[:, :1]  # [B*H, 1, D]
        k = k - k0
        if x.key_padding_mask is not None:  # padded keys add nothing
            k = k * x.key_padding_mask[:, None, :, None].expand(b, h, x.tk, 1).reshape(b * h, x.tk, 1).to(k.dtype)
        if x.pattern is Pattern.CAUSAL_SELF:
            m1, m2 = causal_moments(q, k, x.q_offset)  # [B*H, Tq]
        else:
            m1 = (q @ k.sum(1)[:, :, None])[..., 0]
            m2 = ((q @ (k.mT @ k)) * q).sum(-1)  # q^T (sum_j k_j k_j^T) q
        n = visible_counts(x).clamp(min=1).to(q.dtype)  # [B|1, Tq]
        n = n[:, None].expand(b, h, x.tq).reshape(b * h, x.tq)
        shifted_mean = x.scale * m1 / n
        mu = x.scale * (q @ k0.mT)[..., 0] + shifted_mean
        var = (x.scale**2 * m2 / n - shifted_mean.square()).clamp(min=0)
        return mu, var

    @fast_path("blocked", priority=10)
    def blocked(self, x: AttentionInputs):
        compute = compute_dtype(x.q.dtype)
        b, tq, h, _ = x.q.shape

        def heads_first(t: torch.Tensor) -> torch.Tensor:  # [B, T, H, D] -> [B*H, T, D]
            return t.to(compute).transpose(1, 2).reshape(b * h, t.shape[1], t.shape[3])

        q = heads_first(x.q)
        k = heads_first(repeat_kv(x.k, x.groups))
        v = heads_first(repeat_kv(x.v, x.groups))
        if x.tq <= DIRECT_MAX_QUERIES:  # decoding-sized: the scores are one tile, computed once
            return self._direct(x, q, k, v), None
        mu, var = self._row_stats(x, q, k)  # [B*H, Tq]
        # in base 2, log2(e) (s - (s - m)^2 / (2 xi (var + eps))) = t (c - t) + const with t = r (s - m),
        # m = mu + delta, r = sqrt(log2(e) / (2 xi (var + eps))), c = log2(e) / r: centred, nothing large cancels
        xi = self.spread.to(compute).square().repeat(b)[:, None]  # [B*H, 1]
        r = torch.rsqrt(2 * xi * (var + self.options.eps)) * math.sqrt(LOG2E)  # [B*H, Tq]
        m = mu + self.offset.to(compute).repeat(b)[:, None]
        valid = None
        if x.key_padding_mask is not None:
            valid = x.key_padding_mask[:, None, :].expand(b, h, x.tk).reshape(b * h, x.tk)
        causal_offset = x.q_offset if x.pattern is Pattern.CAUSAL_SELF else None
        qs = q * (r * x.scale)[..., None]  # r * scale * q: one matmul gives r s
        out = quadratic_logit_attention(qs, k, v, -r * m, LOG2E / r, valid=valid, causal_offset=causal_offset)
        out = out.view(b, h, tq, -1).transpose(1, 2)  # [B, Tq, H, Dv]
        return out.to(x.q.dtype).contiguous(), None

    def _direct(self, x: AttentionInputs, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Few queries (``[B*H, Tq, D]``, Tq <= DIRECT_MAX_QUERIES): scores once, row statistics from them."""
        b, h = x.batch, x.heads
        scores = (q @ k.mT).view(b, h, x.tq, x.tk) * x.scale  # [B, H, Tq, Tk]: Tq rows only
        probs = self.gaussian_weights(scores, visibility(x))
        out = probs.view(b * h, x.tq, x.tk) @ v  # [B*H, Tq, Dv]
        return out.view(b, h, x.tq, -1).transpose(1, 2).to(x.q.dtype).contiguous()

    # ---- costs -------------------------------------------------------------------------------------

    def flops(self, shape: Shape, pattern: Pattern) -> float:
        """Softmax attention's products plus the closed-form row moments (sums of k k^T, q^T M q per query)."""
        per_head = 2.0 * shape.tq * shape.tk * (shape.dk + shape.dv) * causal_factor(shape, pattern)
        moments = 2.0 * shape.tq * shape.dk * (shape.dk + 2) + 2.0 * shape.tk * shape.dk * shape.dk
        return shape.batch * shape.heads * (per_head + moments)
