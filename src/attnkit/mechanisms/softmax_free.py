"""SOFT — Softmax-free Linear Transformers (Lu et al.; NeurIPS 2021 as "SOFT: Softmax-free Transformer
with Linear Complexity", arXiv:2110.11945; IJCV 2024, arXiv:2207.03341). Code: github.com/fudan-zvg/SOFT.

    S(a, b)_ij = exp(-scale * |a_i - b_j|^2 / 2)                     Gaussian kernel instead of softmax
    out ~= S(Q, K~) pinv(S(Q~, K~)) S(Q~, K) V                        Nystrom form with m landmarks Q~, K~

SOFT ties Q and K (one projection) and divides it by d^(1/4), i.e. scale = 1/sqrt(d), the default here;
attnkit is given q and k, so the kernel is applied to them as given (tied inputs reproduce SOFT). The
landmarks are SOFT's bottleneck tokens in their parameter-free form: average pools of m runs of
consecutive *real* tokens (padding never enters a landmark; fewer real tokens than m: one landmark per
token). pinv is SOFT's Newton–Schulz estimate V <- 2V - V P V of the inverse of P = S(Q~, K~) + ridge*I,
started from alpha P^T with alpha = 1.8 / (|P|_1 |P|_inf). SOFT starts from alpha P with 1.8 over the
squared largest row sum of S(Q~, K~): the same for its symmetric kernel but for the ridge, and P^T with
both norms of P is what keeps untied (non-symmetric) P convergent. Computed in fp32 (fp64 for fp64
inputs), gradients through the iterations. ``normalize`` is SOFT-Norm (IJCV): pinv -> D^-1/2 pinv D^-1/2,
D the row sums of S(Q~, K~).
The landmarks pool the whole sequence, so there are no causal patterns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InvalidOption
from ..inputs import AttentionInputs
from ..mechanism import Complexity, Mechanism, Paper, Shape, fast_path, register_mechanism
from ..ops.gqa import repeat_kv
from ..ops.reference import compute_dtype
from ..options import check_float, check_int
from ..patterns import Pattern

PINV_ALPHA = 1.8  # 0.9 * 2: SOFT's start V0 = alpha P^T with alpha 10% under the convergence bound 2/sigma_max^2


@dataclass(frozen=True)
class SoftmaxFreeOptions:
    landmarks: int = 64  # m: bottleneck tokens, each the average of a run of consecutive real tokens
    newton_iters: int = 20  # Newton–Schulz iterations of the pseudo-inverse (SOFT's default)
    ridge: float = 0.01  # added to the landmark kernel's diagonal before inverting (SOFT's newton_inv)
    normalize: bool = False  # SOFT-Norm: D^-1/2 pinv D^-1/2, D = row sums of the landmark kernel

    def __post_init__(self):
        check_int("softmax_free", "landmarks", self.landmarks)
        check_int("softmax_free", "newton_iters", self.newton_iters)
        check_float("softmax_free", "ridge", self.ridge)
        if self.ridge < 0:
            raise InvalidOption(f"softmax_free option ridge={self.ridge!r} is not valid; expected a number >= 0")
        if not isinstance(self.normalize, bool):
            raise InvalidOption(f"softmax_free option normalize={self.normalize!r} is not valid; expected a bool")


def landmark_pools(real: torch.Tensor, count: torch.Tensor, m: int, dtype: torch.dtype) -> torch.Tensor:
    """Averaging weights ``[B, m, T]``: landmark a is the mean of the real tokens whose rank r among the
    real tokens (0..n-1) has floor(r * count / n) == a; ``count`` ``[B]`` (<= n) landmarks per row, the
    other rows of the result are zero. ``real [B, T]`` bool."""
    n = real.sum(1, keepdim=True)  # [B, 1]
    rank = real.cumsum(1) - 1  # [B, T]
    seg = torch.div(rank * count[:, None], n.clamp(min=1), rounding_mode="floor")  # [B, T]
    slots = torch.arange(m, device=real.device)[None, :, None]  # [1, m, 1]
    member = (seg[:, None, :] == slots) & real[:, None, :]  # [B, m, T]
    member = member.to(dtype)
    return member / member.sum(-1, keepdim=True).clamp(min=1)


def newton_pinv(P: torch.Tensor, iters: int) -> torch.Tensor:
    """Newton–Schulz estimate of pinv(P) for ``P [..., m, m]``: V0 = alpha P^T, V <- 2V - V P V.

    alpha < 2 / sigma_max(P)^2 (sigma_max^2 <= |P|_1 |P|_inf) makes every singular direction converge; an
    all-zero P gives V = 0, and zero rows / columns of P stay zero columns / rows of V."""
    bound = P.abs().sum(-1).amax(-1) * P.abs().sum(-2).amax(-1)  # [...] |P|_inf |P|_1
    alpha = torch.where(bound > 0, PINV_ALPHA / torch.where(bound > 0, bound, 1.0), 0.0)
    V = alpha[..., None, None] * P.transpose(-1, -2)
    for _ in range(iters):
        V = 2 * V - V @ (P @ V)
    return V


@register_mechanism("softmax_free")
class SoftmaxFree(Mechanism):
    family = "kernel"
    paper = Paper("SOFT: Softmax-free Transformer with Linear Complexity", 2021, "2110.11945")
    patterns = frozenset({Pattern.NONCAUSAL_SELF, Pattern.NONCAUSAL_CROSS})
    exact = False
    heads_independent = True
    complexity = Complexity(time="O(T·m·D + m³·iters)", memory="O(T·m) (reference: O(Tq·Tk))")
    Options = SoftmaxFreeOptions
    example_options = ({"landmarks": 8}, {"landmarks": 5, "newton_iters": 8, "normalize": True})
    fidelity_knob = ("landmarks", (16, 32, 64))
    # the pseudo-inverse amplifies rounding differences between the two ways of forming the kernels
    tolerances = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}

    # ---- pieces shared by the reference and the fast path ------------------------------------------

    @staticmethod
    def _compute(x: AttentionInputs) -> torch.dtype:
        return compute_dtype(x.q.dtype)

    def _landmark_weights(self, x: AttentionInputs, dt: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooling weights for queries ``[B, m, Tq]`` and keys ``[B, m, Tk]``, the same number of landmarks
        for both: min(m, real queries, real keys) per row (self patterns: the queries are the keys)."""
        m = self.options.landmarks
        kreal = x.key_padding_mask
        if kreal is None:
            kreal = torch.ones(x.batch, x.tk, dtype=torch.bool, device=x.q.device)
        qreal = kreal if x.pattern.is_self else torch.ones(x.batch, x.tq, dtype=torch.bool, device=x.q.device)
        count = torch.minimum(kreal.sum(1), qreal.sum(1)).clamp(max=m)  # [B]
        return landmark_pools(qreal, count, m, dt), landmark_pools(kreal, count, m, dt)

    def _pinv(self, K2: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """SOFT's pseudo-inverse of the landmark kernel ``K2 [B, H, m, m]`` (``valid [B, 1, m]``)."""
        pair = valid[..., :, None] & valid[..., None, :]  # [B, 1, m, m] both landmarks exist
        K2 = K2 * pair
        P = K2 + self.options.ridge * torch.diag_embed(valid.to(K2.dtype)).expand_as(K2)
        V = newton_pinv(P, self.options.newton_iters)
        if self.options.normalize:
            rows = K2.sum(-1)  # [B, H, m]
            d = torch.where(rows > 0, torch.where(rows > 0, rows, 1.0).rsqrt(), 0.0)
            V = d[..., :, None] * V * d[..., None, :]
        return V

    # ---- the specification -------------------------------------------------------------------------

    def reference(self, x: AttentionInputs):
        dt = self._compute(x)
        root = x.scale**0.5  # exp(-scale |q - k|^2 / 2) = exp(-|q' - k'|^2 / 2) with q' = sqrt(scale) q
        q = x.q.to(dt) * root  # [B, Tq, H, D]
        k = repeat_kv(x.k.to(dt), x.groups) * root  # [B, Tk, H, D]
        v = repeat_kv(x.v.to(dt), x.groups)  # [B, Tk, H, Dv]
        wq, wk = self._landmark_weights(x, dt)  # [B, m, Tq], [B, m, Tk]
        q_lm = torch.einsum("bat,bthd->bhad", wq, q)  # [B, H, m, D] query landmarks Q~
        k_lm = torch.einsum("bat,bthd->bhad", wk, k)  # [B, H, m, D] key landmarks K~
        valid = (wk.sum(-1) > 0)[:, None]  # [B, 1, m] landmarks that exist

        def gauss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # [B, H, n, D], [B, H, p, D] -> [B, H, n, p]
            return torch.exp(-0.5 * ((a[:, :, :, None] - b[:, :, None]) ** 2).sum(-1))

        K1 = gauss(q.transpose(1, 2), k_lm)  # [B, H, Tq, m] S(Q, K~)
        K2 = gauss(q_lm, k_lm)  # [B, H, m, m] S(Q~, K~)
        K3 = gauss(q_lm, k.transpose(1, 2))  # [B, H, m, Tk] S(Q~, K)
        if x.key_padding_mask is not None:
            K3 = K3 * x.key_padding_mask[:, None, None, :]  # padded keys get no weight
        A = K1 @ self._pinv(K2, valid) @ K3  # [B, H, Tq, Tk] the approximate softmax-free attention
        out = torch.einsum("bhqk,bkhe->bqhe", A, v)  # [B, Tq, H, Dv]
        return out.to(x.q.dtype), None

    # ---- fast path ---------------------------------------------------------------------------------

    @fast_path("lowrank", priority=10)
    def lowrank(self, x: AttentionInputs):
        """S(Q, K~) (pinv (S(Q~, K~)) (S(Q~, K) V)): never more than T x m. Each kernel is one matmul of
        augmented rows, [s a, -s|a|^2/2, 1] . [b, 1, -s|b|^2/2] = -s|a - b|^2 / 2, and one exp."""
        dt = self._compute(x)
        b, tq, hq, d = x.q.shape
        hkv, g, m = x.kv_heads, x.groups, self.options.landmarks
        q, k, v = x.q.to(dt), x.k.to(dt), x.v.to(dt)
        wq, wk = self._landmark_weights(x, dt)  # [B, m, Tq], [B, m, Tk]
        q_lm = (wq @ q.reshape(b, tq, hq * d)).view(b, m, hkv, g, d).permute(0, 2, 3, 1, 4)  # [B, Hkv, G, m, D]
        k_lm = (wk @ k.reshape(b, x.tk, hkv * d)).view(b, m, hkv, 1, d).permute(0, 2, 3, 1, 4)  # [B, Hkv, 1, m, D]
        valid = (wk.sum(-1) > 0)[:, None, None]  # [B, 1, 1, m]
        s = x.scale

        def left(a: torch.Tensor) -> torch.Tensor:  # [..., n, D] -> [..., n, D + 2]
            return torch.cat([s * a, -0.5 * s * (a * a).sum(-1, keepdim=True), torch.ones_like(a[..., :1])], -1)

        def right(a: torch.Tensor) -> torch.Tensor:
            return torch.cat([a, torch.ones_like(a[..., :1]), -0.5 * s * (a * a).sum(-1, keepdim=True)], -1)

        q = q.view(b, tq, hkv, g, d).permute(0, 2, 3, 1, 4)  # [B, Hkv, G, Tq, D]
        k = k.transpose(1, 2)[:, :, None]  # [B, Hkv, 1, Tk, D]
        if x.key_padding_mask is not None:  # padded keys get no weight: zero their values
            v = v * x.key_padding_mask[:, :, None, None]
        v = v.transpose(1, 2)[:, :, None]  # [B, Hkv, 1, Tk, Dv]
        K3 = torch.exp(left(q_lm) @ right(k).transpose(-1, -2))  # [B, Hkv, G, m, Tk] S(Q~, K)
        pinv = self._pinv(torch.exp(left(q_lm) @ right(k_lm).transpose(-1, -2)), valid)  # [B, Hkv, G, m, m]
        K1 = torch.exp(left(q) @ right(k_lm).transpose(-1, -2))  # [B, Hkv, G, Tq, m] S(Q, K~)
        out = K1 @ (pinv @ (K3 @ v))  # [B, Hkv, G, Tq, Dv]
        out = out.flatten(1, 2).transpose(1, 2)  # [B, Tq, Hq, Dv]
        return out.to(x.q.dtype).contiguous(), None

    # ---- costs -------------------------------------------------------------------------------------

    def flops(self, shape: Shape, pattern: Pattern) -> float:
        m = min(self.options.landmarks, shape.tq, shape.tk)
        kernels = 2.0 * (shape.tq * m + m * m + m * shape.tk) * shape.dk
        newton = self.options.newton_iters * 4.0 * m**3
        apply = 2.0 * (m * shape.tk + m * m + shape.tq * m) * shape.dv
        return shape.batch * shape.heads * (kernels + newton + apply)
