"""Kernelized attention with relative positional encoding — Stable, Fast and Accurate: Kernelized Attention
with Relative Positional Encoding (Luo et al., NeurIPS 2021, arXiv:2106.12566).

    out_i = sum_j c_(i-j) phi(q_i).phi(k_j) v_j  /  (sum_j c_(i-j) phi(q_i).phi(k_j) + eps),   c_d = exp(b_d)

phi are Performer's positive random features, phi(x) = exp(W x - |x|^2/2) / sqrt(m), so that
c_(i-j) phi(q_i).phi(k_j) estimates exp(s q_i.k_j + b_(i-j)) (inputs scaled by s^1/2): softmax attention
with an additive RPE. C = [c_(i-j)] is Toeplitz, so for every feature f and value channel e the sum over
j is a Toeplitz matrix-vector product: the ``fft`` path (the paper's algorithm) computes them all with
FFTs of length >= Tq + Tk - 1, O(T log T m Dv). causal_self sets c_d = 0 for d < 0 (lower triangular,
still one FFT).

b is trainable, one value per head and distance |d| < ``max_len``; farther pairs share the edge value
(clipped, as T5/Shaw RPEs do). That clipping makes a second exact algorithm: C = c+ [j <= i] + c- [j > i]
(prefix and suffix sums: linear attention) + (c_d - c+-) on the band |d| < max_len - 1. The ``banded``
path computes it in O(T max_len (m + Dv)) and is faster than FFTs on CPU; auto picks between them by
FLOPs. ``direct`` is the T x T form, for decoding steps.

Choices: b starts as ALiBi's -slope_h |d| (or zeros); q and k are RMS-normalised before phi (our reading
of the paper's stabilisation: fixed norms bound the variance of the random features); W is drawn once,
orthogonal (FAVOR+), from ``seed``. The decoding state is a KV cache (decoding costs O(T) per step): for
a general b the weight of each past key changes with every new query, so no constant-size summary
exists. (With clipping, a window of max_len - 1 keys plus a linear-attention state would be exact and
bounded; not built here.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidOption, ShapeError
from ..inputs import AttentionInputs
from ..mechanism import Complexity, Mechanism, Paper, Shape, fast_path, register_mechanism
from ..ops.chunked import causal_linear_scan
from ..ops.decay import alibi_slopes
from ..ops.feature_maps import orthogonal_gaussian, positive_random_features
from ..ops.gqa import group_queries, repeat_kv
from ..ops.masking import visibility, visible_counts
from ..ops.reference import compute_dtype
from ..options import MAX_SEED, check_choice, check_float, check_int
from ..patterns import Pattern
from ..state import KVCache

DIRECT_MAX_QUERIES = 64  # up to this many queries (decoding steps, short chunks) the T x T form is cheaper
FFT_BUDGET = 1 << 24  # elements of one batch of FFT channels (128 MiB in fp64): bounds the working memory
# FFT rounding is relative to a channel's whole energy, not to each output: in fp32, early causal rows
# (few keys, small sums) got 3e-3 relative error at T = 300. The transforms run in fp64 (~1.5x the time).
FFT_DTYPE = torch.float64
BAND_BLOCK = 64  # query rows per block of the banded path
BAND_MAX_SCORES = 1 << 27  # band scores of one kv head (512 MiB in fp32) above which auto takes fft
# Measured on the 2-core CPU (T 4K, H 8, m 64): an FFT FLOP costs ~5x a matmul FLOP (fft 19 GFLOP in 20 s,
# banded 70 GFLOP in 15 s); auto takes banded while it needs fewer than 5x the FLOPs of fft.
FFT_SLOWDOWN = 5.0


@dataclass(frozen=True)
class KernelRPEFFTOptions:
    features: int = 64  # m, positive random features (drawn once, at create, from seed)
    seed: int = 0  # seed of the orthogonal random projection W
    max_len: int = 512  # the RPE has one value per distance |i-j| < max_len; farther pairs share the edge value
    normalize: bool = True  # RMS-normalise q and k before phi (bounds the features' variance, Luo et al. §4)
    rpe_init: str = "alibi"  # initial b: alibi (-slope_h |i-j|, a distinct locality per head) or zeros
    eps: float = 1e-6  # added to the denominator, so a query that sees no key gets zeros

    def __post_init__(self):
        check_int("kernel_rpe_fft", "features", self.features)
        check_int("kernel_rpe_fft", "seed", self.seed, minimum=0, maximum=MAX_SEED)
        check_int("kernel_rpe_fft", "max_len", self.max_len)
        if not isinstance(self.normalize, bool):
            raise InvalidOption(f"kernel_rpe_fft option normalize={self.normalize!r} is not valid; expected a bool")
        check_choice("kernel_rpe_fft", "rpe_init", self.rpe_init, ("alibi", "zeros"))
        check_float("kernel_rpe_fft", "eps", self.eps, positive=True)


def _shape(x: AttentionInputs) -> Shape:
    return Shape(x.batch, x.tq, x.tk, x.heads, x.kv_heads, x.q.shape[-1], x.v.shape[-1])


def fast_fft_length(n: int) -> int:
    """The smallest 2^a 3^b 5^c >= n (lengths the FFT handles fastest)."""
    best = 1 << max(0, (n - 1).bit_length())
    five = 1
    while five < best:
        three = five
        while three < best:
            p = three
            while p < n:
                p *= 2
            best = min(best, p)
            three *= 3
        five *= 5
    return best


@register_mechanism("kernel_rpe_fft")
class KernelRPEFFT(Mechanism):
    family = "kernel"
    paper = Paper(
        "Stable, Fast and Accurate: Kernelized Attention with Relative Positional Encoding", 2021, "2106.12566"
    )
    patterns = frozenset({Pattern.NONCAUSAL_SELF, Pattern.CAUSAL_SELF})
    exact = False
    trainable = True
    uses_scale = True
    state_kind = KVCache
    complexity = Complexity(
        time="O(T·log T·m·Dv) (fft), O(T·max_len·(m+Dv)) (banded)", memory="O(T·m·Dv) (state: KV cache, O(T))"
    )
    Options = KernelRPEFFTOptions
    # fp32: out = num / (den + eps) cancels in the gradient; at T = 1 the true dq is ~1e-3 and every fp32
    # path, the reference included, is 2-5e-5 (relative) off the fp64 gradient
    tolerances = {torch.float64: 1e-9, torch.float32: 5e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}
    example_options = ({}, {"features": 16, "max_len": 8, "normalize": False, "seed": 3})
    fidelity_knob = ("features", (32, 64, 128))

    def __init__(self, heads: int | None = None, head_dim: int | None = None, **options):
        super().__init__(heads, head_dim, **options)
        opts = self.options
        # W is not trained (a fixed random draw): a buffer, saved with the module
        self.register_buffer("projection", orthogonal_gaussian(opts.features, head_dim, opts.seed).float())
        n = opts.max_len
        dist = torch.arange(-(n - 1), n, dtype=torch.float32).abs()  # |d| for d = -(n-1) .. n-1
        slopes = torch.tensor(alibi_slopes(heads), dtype=torch.float32)[:, None]  # [H, 1]
        init = -slopes * dist if opts.rpe_init == "alibi" else torch.zeros(heads, 2 * n - 1)
        self.rpe = nn.Parameter(init)  # b_d per head: [H, 2 max_len - 1], entry d + max_len - 1

    def check_call(self, x: AttentionInputs) -> None:
        super().check_call(x)
        if x.q.shape[-1] != self.head_dim:
            raise ShapeError(f"{self.name} was created for head_dim {self.head_dim}; got q with {x.q.shape[-1]}")

    # ---- the pieces of the formula ----------------------------------------------------------------

    def phi(self, x: AttentionInputs, role: str) -> torch.Tensor:
        """Positive random features ``[B, T, H, m]`` of q or k (fp32, fp64 for fp64 inputs)."""
        dtype = compute_dtype(x.q.dtype)
        t = (x.q if role == "q" else x.k).to(dtype)
        if self.options.normalize:  # RMS norm: |t|^2 = Dk for every token
            t = F.normalize(t, dim=-1, eps=1e-6) * math.sqrt(t.shape[-1])
        t = t * math.sqrt(x.scale)  # phi(q).phi(k) then estimates exp(scale q.k)
        return positive_random_features(t, self.projection.to(dtype), per_row_max=role == "q")  # [B, T, H, m]

    def rpe_at(self, dist: torch.Tensor, causal: bool, dtype: torch.dtype) -> torch.Tensor:
        """``c_d = exp(b_d)`` ``[H, *dist.shape]`` for integer distances d = i - j (0 for d < 0 when causal)."""
        n = self.options.max_len
        c = torch.exp(self.rpe.to(dtype)[:, dist.clamp(-(n - 1), n - 1) + n - 1])
        return c * (dist >= 0).to(dtype) if causal else c

    def _distances(self, x: AttentionInputs) -> torch.Tensor:
        """``i - j`` ``[Tq, Tk]``, query i at key position i + q_offset (after a KV cache)."""
        i = torch.arange(x.tq, device=x.q.device)[:, None] + x.q_offset
        return i - torch.arange(x.tk, device=x.q.device)[None, :]

    # ---- the specification -------------------------------------------------------------------------

    def reference(self, x: AttentionInputs):
        q, k = self.phi(x, "q"), self.phi(x, "k")  # [B, Tq, H, m], [B, Tk, Hkv, m]
        v = repeat_kv(x.v.to(q.dtype), x.groups)  # [B, Tk, H, Dv]
        a = torch.einsum("bqhf,bkhf->bhqk", q, repeat_kv(k, x.groups))  # phi(q_i).phi(k_j): [B, H, Tq, Tk]
        a = a * self.rpe_at(self._distances(x), x.pattern is Pattern.CAUSAL_SELF, q.dtype)  # * c_(i-j)
        seen = visibility(x)  # pattern and padding: [B or 1, 1, Tq, Tk]
        if seen is not None:
            a = a * seen
        num = torch.einsum("bhqk,bkhe->bqhe", a, v)  # [B, Tq, H, Dv]
        den = a.sum(-1).transpose(1, 2)[..., None]  # [B, Tq, H, 1]
        return (num / (den + self.options.eps)).to(x.q.dtype), None

    # ---- fast paths --------------------------------------------------------------------------------

    def _phi_k(self, x: AttentionInputs) -> torch.Tensor:
        """phi(k) with padded keys zeroed: they add nothing to either sum."""
        k = self.phi(x, "k")
        if x.key_padding_mask is not None:
            k = k * x.key_padding_mask[:, :, None, None].to(k.dtype)
        return k

    def _finish(self, out: torch.Tensor, x: AttentionInputs) -> torch.Tensor:
        """``[..., Dv + 1]`` numerator and denominator -> the output in q's dtype."""
        return (out[..., :-1] / (out[..., -1:] + self.options.eps)).to(x.q.dtype)

    @fast_path("fft", priority=10)
    def fft(self, x: AttentionInputs):
        """Every channel phi_f(k_j) [v_j, 1] is convolved with the RPE kernel by FFT, then read by phi(q_i)."""
        q, k = self.phi(x, "q"), self._phi_k(x)  # [B, Tq, Hq, m], [B, Tk, Hkv, m]
        v1 = torch.cat([x.v.to(q.dtype), torch.ones_like(x.v[..., :1], dtype=q.dtype)], -1)  # [B, Tk, Hkv, Dv+1]
        # kernel w_n = c_(d_min + n), d = i - j from q_offset - (Tk-1) to q_offset + Tq - 1: conv index i + Tk - 1
        d = torch.arange(x.q_offset - x.tk + 1, x.q_offset + x.tq, device=q.device)  # [Tq + Tk - 1]
        n = fast_fft_length(x.tq + x.tk - 1)  # no circular wrap-around reaches the rows we read
        c = self.rpe_at(d, x.pattern is Pattern.CAUSAL_SELF, FFT_DTYPE)
        kernel = torch.fft.rfft(c, n=n)  # [Hq, n//2+1]
        m, e = q.shape[-1], v1.shape[-1]
        step = max(1, min(m, FFT_BUDGET // (e * n)))  # features per FFT batch
        heads: list[torch.Tensor] = []
        for hk in range(x.kv_heads):
            acc: list[torch.Tensor | None] = [None] * x.groups
            for f0 in range(0, m, step):
                fs = slice(f0, f0 + step)
                u = torch.einsum("bkf,bke->bfek", k[:, :, hk, fs], v1[:, :, hk])  # [B, step, Dv+1, Tk]
                u_hat = torch.fft.rfft(u.to(FFT_DTYPE), n=n)  # [B, step, Dv+1, n//2+1]
                for g in range(x.groups):
                    h = hk * x.groups + g
                    conv = torch.fft.irfft(u_hat * kernel[h], n=n)[..., x.tk - 1 : x.tk - 1 + x.tq]  # C (phi(k) v)
                    part = torch.einsum("bqf,bfeq->bqe", q[:, :, h, fs], conv.to(q.dtype))  # [B, Tq, Dv+1]
                    acc[g] = part if acc[g] is None else acc[g] + part
            heads.extend(acc)
        out = self._finish(torch.stack(heads, dim=2), x)  # [B, Tq, Hq, Dv]
        # FFT rounding spreads a little of the total energy over every row: a row that sees no real key
        # would get noise / (noise + eps) instead of 0
        seen = visible_counts(x) > 0  # [B or 1, Tq]
        return torch.where(seen[:, :, None, None], out, torch.zeros((), dtype=out.dtype)), None

    @fast_path("direct", priority=lambda mech, x: 20 if x.tq <= DIRECT_MAX_QUERIES else 0)
    def direct(self, x: AttentionInputs):
        """The T x T form, grouped by kv head: the fastest way for a few queries (decoding)."""
        q, k = self.phi(x, "q"), self._phi_k(x)
        v = x.v.to(q.dtype)
        a = torch.einsum("bqhgf,bkhf->bhgqk", group_queries(q, x.kv_heads), k)  # [B, Hkv, G, Tq, Tk]
        c = self.rpe_at(self._distances(x), x.pattern is Pattern.CAUSAL_SELF, q.dtype)  # [Hq, Tq, Tk]
        a = a * c.view(x.kv_heads, x.groups, x.tq, x.tk)
        num = torch.einsum("bhgqk,bkhe->bqhge", a, v).flatten(2, 3)  # [B, Tq, Hq, Dv]
        den = a.sum(-1).flatten(1, 2).transpose(1, 2)[..., None]  # [B, Tq, Hq, 1]
        return (num / (den + self.options.eps)).to(x.q.dtype), None

    def _band(self, causal: bool, tq: int, tk: int, q_offset: int) -> tuple[int, int]:
        """Distances ``-after <= i - j <= before`` where c_(i-j) differs from its clipped edge value (|d| >=
        max_len - 1 all share b at +-(max_len - 1)), cut to the distances the call has."""
        edge = self.options.max_len - 2
        return min(edge, q_offset + tq - 1), (-1 if causal else min(edge, tk - 1 - q_offset))

    def _span(self, shape: Shape, causal: bool) -> int:
        """Keys one block of the banded path reads (0: no band, the clipped RPE is one value)."""
        before, after = self._band(causal, shape.tq, shape.tk, shape.tk - shape.tq if causal else 0)
        return BAND_BLOCK + before + max(after, 0) if before >= 0 else 0

    def prefers_banded(self, shape: Shape, causal: bool) -> bool:
        """Auto's choice between banded and fft: the FLOPs of both, and the band scores' memory."""
        small = (shape.heads // shape.kv_heads) * (shape.tq + BAND_BLOCK) * self._span(shape, causal)
        cheap = self._banded_flops(shape, causal) <= FFT_SLOWDOWN * self._fft_flops(shape)
        return small <= BAND_MAX_SCORES and cheap

    @fast_path("banded", priority=lambda mech, x: 15 if mech.prefers_banded(_shape(x), x.pattern.is_causal) else 5)
    def banded(self, x: AttentionInputs):
        """Exact for the clipped RPE: beyond max_len - 1, c_d is one value c+ (d > 0) or c- (d < 0), so
        C = c+ [j <= i] + c- [j > i] (prefix and suffix sums: linear attention, O(T m Dv)) plus the
        correction c_d - c+- on the band |d| < max_len - 1 (query blocks against their key windows)."""
        q, k = self.phi(x, "q"), self._phi_k(x)  # [B, Tq, Hq, m], [B, Tk, Hkv, m]
        v1 = torch.cat([x.v.to(q.dtype), torch.ones_like(x.v[..., :1], dtype=q.dtype)], -1)  # [B, Tk, Hkv, Dv+1]
        c_pos, c_neg = torch.exp(self.rpe.to(q.dtype)[:, -1]), torch.exp(self.rpe.to(q.dtype)[:, 0])  # [Hq]
        past = x.q_offset  # keys of a KV cache, all before the first query
        s0 = torch.einsum("bkhf,bkhe->bhfe", k[:, :past], v1[:, :past]) if past else None  # [B, Hkv, m, e]
        prefix, _ = causal_linear_scan(q, k[:, past:], v1[:, past:], s0)  # sum over j <= i: [B, Tq, Hq, e]
        out = prefix * c_pos[:, None]
        if x.pattern is not Pattern.CAUSAL_SELF:  # keys after the query: all keys minus the prefix
            total = torch.einsum("bkhf,bkhe->bhfe", k, v1)  # [B, Hkv, m, e]
            every = torch.einsum("bqhgf,bhfe->bqhge", group_queries(q, x.kv_heads), total).flatten(2, 3)
            out = out + (every - prefix) * c_neg[:, None]
        before, after = self._band(x.pattern is Pattern.CAUSAL_SELF, x.tq, x.tk, x.q_offset)
        if before >= 0:
            out = out + self._band_sums(q, k, v1, x, before, max(after, 0), c_pos, c_neg)
        out = out[..., :-1] / (out[..., -1:] + self.options.eps)
        return out.to(x.q.dtype), None

    def _band_sums(self, q, k, v1, x: AttentionInputs, before: int, after: int, c_pos, c_neg) -> torch.Tensor:
        """sum_j (c_(i-j) - c+-) phi(q_i).phi(k_j) [v_j, 1] over ``-after <= i - j <= before``: each block of
        BAND_BLOCK queries against its ``block + before + after`` keys (zero-padded at the ends); the key
        windows overlap and are strided views, never copies."""
        b, tq, hq, m = q.shape
        hkv, g, e = x.kv_heads, x.groups, v1.shape[-1]
        p, nb, span = BAND_BLOCK, -(-tq // BAND_BLOCK), BAND_BLOCK + before + after
        left = max(0, before - x.q_offset)  # block n's first key sits at n p + q_offset - before
        start = x.q_offset - before + left
        right = max(0, start + (nb - 1) * p + span - (left + x.tk))
        kp = F.pad(k, (0, 0, 0, 0, left, right))[:, start:].transpose(1, 2).contiguous()  # [B, Hkv, Tk', m]
        vp = F.pad(v1, (0, 0, 0, 0, left, right))[:, start:].transpose(1, 2).contiguous()  # [B, Hkv, Tk', e]
        qb = F.pad(q, (0, 0, 0, 0, 0, nb * p - tq)).view(b, nb, p, hkv, g, m)
        qb = qb.permute(0, 3, 1, 4, 2, 5).reshape(b, hkv, nb, g * p, m)  # rows: (query head in group, row)
        d = torch.arange(p, device=q.device)[:, None] + before - torch.arange(span, device=q.device)  # [p, span]
        edge = torch.where(d >= 0, c_pos[:, None, None], c_neg[:, None, None])  # [Hq, p, span]
        w = torch.where((d <= before) & (d >= -after), self.rpe_at(d, False, q.dtype) - edge, 0.0)
        w = w.view(hkv, g * p, span)
        outs = []
        for bi in range(b):
            for h in range(hkv):
                kw = kp[bi, h].unfold(0, span, p)[:nb]  # [nb, m, span]: block n's keys (a view)
                vw = vp[bi, h].unfold(0, span, p)[:nb].transpose(1, 2)  # [nb, span, e]
                scores = torch.bmm(qb[bi, h], kw) * w[h]  # [nb, G p, span]
                outs.append(torch.bmm(scores, vw))  # [nb, G p, e]
        out = torch.stack(outs).view(b, hkv, nb, g, p, e).permute(0, 2, 4, 1, 3, 5)  # [B, nb, p, Hkv, G, e]
        return out.reshape(b, nb * p, hq, e)[:, :tq]

    # ---- costs -------------------------------------------------------------------------------------

    def flops(self, shape: Shape, pattern: Pattern) -> float:
        """The FLOPs of the path auto takes for a full call (banded or fft; direct is for decoding)."""
        causal = pattern is Pattern.CAUSAL_SELF
        if self.prefers_banded(shape, causal):
            return shape.batch * self._banded_flops(shape, causal)
        return shape.batch * self._fft_flops(shape)

    def _features_flops(self, shape: Shape) -> float:
        return 2.0 * self.options.features * shape.dk * (shape.tq * shape.heads + shape.tk * shape.kv_heads)

    def _fft_flops(self, shape: Shape) -> float:
        """Per batch row: phi, the channels phi(k) [v, 1] and their FFTs, one spectral product and inverse
        FFT per query head, the read-out by phi(q) (a real FFT of length n: ~2.5 n log2 n)."""
        m, e = self.options.features, shape.dv + 1
        n = fast_fft_length(shape.tq + shape.tk - 1)
        fft = 2.5 * n * math.log2(max(n, 2))
        channels = shape.kv_heads * m * e * (shape.tk + fft)  # build and transform
        per_query_head = m * e * (6.0 * (n // 2 + 1) + fft) + 2.0 * shape.tq * m * e
        return self._features_flops(shape) + channels + shape.heads * per_query_head

    def _banded_flops(self, shape: Shape, causal: bool) -> float:
        """Per batch row: phi, the prefix (and suffix) sums of linear attention, and every query block
        against its band of keys (scores and values)."""
        m, e = self.options.features, shape.dv + 1
        span = self._span(shape, causal)
        blocks = -(-shape.tq // BAND_BLOCK) * BAND_BLOCK
        linear = (2 if causal else 4) * 2.0 * (shape.tk * shape.kv_heads + shape.tq * shape.heads) * m * e
        return self._features_flops(shape) + linear + 2.0 * shape.heads * blocks * span * (m + e)
