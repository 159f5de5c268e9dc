"""Complex multi-head attention — ComplexFormer: Disruptively Advancing Transformer Inference Ability via
Head-Specific Complex Vector Attention (Shao et al., 2025, arXiv:2505.10222).

Euler transform per head: the Dk real dims of q and k form J = Dk / 2 complex numbers
z_j = x_j + i x_{j+J} = r_j exp(i theta_j) (the halves pairing of ``ops/rope.py``). With a per-head
adaptive differential rotation,

    A_mn = scale * Re sum_j r^q_mj r^k_nj exp(i (Adapt_h(AS_mn,j) + Delta_h(P_mn)_j)),     out = softmax(A) v
    AS_mn,j = theta^q_mj - theta^k_nj   (semantic angle difference),   P_mn = m - n   (relative position)
    Adapt_h(a) = beta_h a,   Delta_h(P)_j = P omega_hj,   beta_h and omega_hj learned per head.

The paper (withdrawn, no public code) gives Adapt and Delta only as learned per-head functions; we take
the linear forms above (beta_h = 1 and RoPE's omega_j = base^(-2j/Dk) at init, so a fresh mechanism equals
softmax attention with RoPE). Linear Adapt and Delta make the score a real inner product of transformed
vectors, q~_m = r^q (cos phi^q_m, sin phi^q_m) with phi^q_m = beta_h theta^q_m + m omega_h (k likewise),
so the ``sdpa`` path runs the fused kernel on q~, k~: no T x T tensor, like RoPE. Positions are absolute
and continue across chunked calls; only their differences matter, so a sequence shifted by left padding
scores the same. The decoding state keeps keys already rotated (``RotatedKVCache``), so a step transforms
one key, not the cache. Cross patterns have no shared positions and raise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import InvalidOption, ShapeError
from ..inputs import AttentionInputs
from ..mechanism import Complexity, Mechanism, Paper, Shape, fast_path, register_mechanism
from ..ops.flops import causal_factor
from ..ops.gqa import repeat_kv
from ..ops.masking import masked_softmax, visibility
from ..ops.reference import upcast_qkv
from ..ops.sdpa import masked_sdpa
from ..options import check_float
from ..patterns import Pattern
from ..state import KVCache


@dataclass(frozen=True)
class ComplexOptions:
    base: float = 10000.0  # omega_hj starts at base^(-2j/Dk) for every head (RoPE's frequencies)
    init_adapt: float = 1.0  # beta_h at init: Adapt_h(a) = beta_h a scales the semantic angle difference

    def __post_init__(self):
        check_float("complex", "base", self.base, positive=True)
        check_float("complex", "init_adapt", self.init_adapt)


def euler_transform(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``t [..., D]`` -> (r, theta) ``[..., D/2]``: modulus and argument of z_j = t_j + i t_{j+D/2}.

    The real part gets the dtype's sqrt(tiny) added (it moves only values below ~1e-12 in fp32), so a
    zero pair has theta = 0 and finite gradients, where |z| and arg z have none.
    """
    x, y = t.chunk(2, dim=-1)
    x = x + torch.finfo(t.dtype).tiny ** 0.5
    return torch.hypot(x, y), torch.atan2(y, x)


@dataclass(frozen=True)
class RotatedKVCache(KVCache):
    """Decoding state of complex attention: every past key after its Euler transform and the rotation of its
    position, ``k [B, T, Hq, Dk]``, and the values ``v [B, T, Hq, Dv]``, one per query head (the rotation's
    parameters differ between the query heads of a GQA group). A decoding step then transforms one key, not
    the whole cache. The paths join it themselves (the base class would store raw keys)."""


@register_mechanism("complex")
class Complex(Mechanism):
    family = "softmax variant"
    paper = Paper(
        "ComplexFormer: Disruptively Advancing Transformer Inference Ability via Head-Specific Complex Vector "
        "Attention",
        2025,
        "2505.10222",
    )
    patterns = frozenset({Pattern.NONCAUSAL_SELF, Pattern.CAUSAL_SELF})  # relative positions need self patterns
    exact = False
    trainable = True
    state_kind = RotatedKVCache
    complexity = Complexity(time="O(Tq·Tk·D)", memory="O(Tq + Tk) fused (reference: O(Tq·Tk·D))")
    Options = ComplexOptions
    example_options = ({"init_adapt": 0.75},)

    def __init__(self, heads: int | None = None, head_dim: int | None = None, **options):
        super().__init__(heads, head_dim, **options)
        if head_dim % 2:
            raise InvalidOption(f"complex pairs head dims into complex numbers; head_dim must be even, got {head_dim}")
        inv_freq = self.options.base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # [J]
        self.adapt = nn.Parameter(torch.full((heads,), float(self.options.init_adapt)))  # beta_h
        self.freqs = nn.Parameter(inv_freq.repeat(heads, 1))  # omega_hj: [H, J]

    def check_call(self, x: AttentionInputs) -> None:
        super().check_call(x)
        if x.q.shape[-1] != self.head_dim:
            raise ShapeError(f"complex was created for head_dim={self.head_dim}; got q with head dim {x.q.shape[-1]}")

    # ---- the specification -------------------------------------------------------------------------

    def reference(self, x: AttentionInputs):
        past = x.state.length if x.state is not None else 0  # tokens before this call
        q, k, v = upcast_qkv(x)  # k, v repeated to the query heads: each rotates with its own params
        compute = q.dtype
        rq, th_q = euler_transform(q)  # [B, Tq, H, J] polar form of the query's complex vector
        rk, th_k = euler_transform(k)  # [B, Tk, H, J]
        beta, omega = self.adapt.to(compute), self.freqs.to(compute)  # [H], [H, J]
        m = torch.arange(x.tq, device=q.device) + past  # absolute positions
        n = torch.arange(x.tk, device=q.device) + past
        semantic = th_q[:, :, None] - th_k[:, None, :]  # AS_mn: [B, Tq, Tk, H, J]
        relative = (m[:, None] - n[None, :]).to(compute)  # P_mn: [Tq, Tk]
        angle = beta[:, None] * semantic + relative[:, :, None, None] * omega  # Adapt(AS) + Delta(P)
        # Re[r^q r^k exp(i angle)] = r^q r^k cos(angle), summed over the J complex dims
        scores = (rq[:, :, None] * rk[:, None, :] * angle.cos()).sum(-1).permute(0, 3, 1, 2)  # [B, H, Tq, Tk]
        k_all, v_all, mask, new_state = self._join(x, self.rotate(k, n).to(x.k.dtype), v.to(x.v.dtype))
        if past:  # cached keys are stored as r^k exp(i (beta theta^k + n omega)): Re[q~ conj(k~)] is the formula
            cached = torch.einsum("bqhd,bkhd->bhqk", self.rotate(q, m), k_all[:, :past].to(compute))
            scores, v = torch.cat([cached, scores], dim=-1), v_all.to(compute)  # [B, H, Tq, past + Tk]
        seen = visibility(x.replace(k=k_all, v=v_all, key_padding_mask=mask, q_offset=past))
        probs = masked_softmax(scores * x.scale, seen)
        out = torch.einsum("bhqk,bkhd->bqhd", probs, v)  # [B, Tq, H, Dv]
        return out.to(x.q.dtype), new_state

    # ---- fast path ---------------------------------------------------------------------------------

    def rotate(self, t: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``t [B, T, H, D]`` -> r (cos phi, sin phi) with phi = beta_h theta + position * omega_h.

        The position angles are reduced mod 2 pi in fp64 (a product of T and omega keeps ~T ulps of error in
        fp32); the rest is O(T·D) work in t's dtype.
        """
        r, theta = euler_transform(t)  # [B, T, H, J]
        turns = positions.double()[:, None, None] * self.freqs.double()  # [T, H, J]
        phase = torch.addcmul(turns.remainder(2 * math.pi).to(t.dtype), theta, self.adapt.to(t.dtype)[:, None])
        return torch.cat([r * phase.cos(), r * phase.sin()], dim=-1)  # [B, T, H, D]

    @fast_path("sdpa", priority=10)
    def sdpa(self, x: AttentionInputs):
        compute = torch.promote_types(x.q.dtype, torch.float32)
        past = x.state.length if x.state is not None else 0
        m = torch.arange(x.tq, device=x.q.device) + past
        q = self.rotate(x.q.to(compute), m).to(x.q.dtype)  # [B, Tq, H, Dk]
        k = self.rotate(repeat_kv(x.k, x.groups).to(compute), m).to(x.k.dtype)  # [B, Tk, H, Dk] (self: Tk = Tq)
        k, v, mask, new_state = self._join(x, k, repeat_kv(x.v, x.groups))  # kv per query head: k~ differs in a group
        return masked_sdpa(x.replace(q=q, k=k, v=v, key_padding_mask=mask, q_offset=past)), new_state

    # ---- state -------------------------------------------------------------------------------------

    def join_cache(self, x: AttentionInputs):
        return x, None  # the paths join the cache: it holds rotated keys, which only they compute

    def _join(self, x: AttentionInputs, k: torch.Tensor, v: torch.Tensor):
        """Rotated keys and values of this call after the cached ones: (k, v, key mask, next state or None)."""
        if x.state is None and not x.want_state:
            return k, v, x.key_padding_mask, None
        cache = x.state or self.init_state(
            x.batch, x.kv_heads, k.shape[-1], v.shape[-1], device=k.device, dtype=k.dtype
        )
        return cache.extend(k, v, x.key_padding_mask)

    def empty_state(self, batch, kv_heads, dk, dv, *, device=None, dtype=torch.float32) -> RotatedKVCache:
        return RotatedKVCache.empty(batch, self.heads, dk, dv, device=device, dtype=dtype)

    def check_state(self, state, k: torch.Tensor, v: torch.Tensor) -> None:
        want = (k.shape[0], self.heads, k.shape[-1], v.shape[-1])
        got = (state.k.shape[0], state.k.shape[2], state.k.shape[3], state.v.shape[3])
        state.check_fits("batch, heads, dk, dv", got, want, k.device)

    def state_bytes(self, shape: Shape, dtype: torch.dtype = torch.float32) -> int:
        elt = torch.empty(0, dtype=dtype).element_size()
        return shape.batch * shape.tk * shape.heads * (shape.dk + shape.dv) * elt

    # ---- costs -------------------------------------------------------------------------------------

    def flops(self, shape: Shape, pattern: Pattern) -> float:
        """As softmax attention (the Euler transform is O(T·D))."""
        per_head = 2.0 * shape.tq * shape.tk * (shape.dk + shape.dv)
        return shape.batch * shape.heads * per_head * causal_factor(shape, pattern)
