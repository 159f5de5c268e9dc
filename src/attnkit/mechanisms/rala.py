"""RALA — Breaking the Low-Rank Dilemma of Linear Attention (Fan, Huang & He, 2024, CVPR 2025,
arXiv:2411.07635): Rank-Augmented Linear Attention, as the authors' code writes it (github.com/qhfan/RALA,
``GateLinearAttentionNoSilu``), phi = elu + 1:

    alpha_j = softmax_j(scale * qbar . phi(k_j)),    qbar = mean_i phi(q_i)          (KV-buffer augmentation)
    out_i = phi(q_i) S / (phi(q_i) . z + eps),       S = sum_j alpha_j phi(k_j) v_j^T,  z = sum_j alpha_j phi(k_j)
    y_i = out_i * (q_i W_h + b_h)                                                    (output augmentation)

The code multiplies alpha by N and divides the buffer by N (two N^-1/2 factors): they cancel exactly,
eps included. The paper's output gate is a linear map of the block input x_i; a mechanism sees only
q, k, v, so here it is a learned per-head affine map of q_i (itself a linear map of x_i), which exists
in all four patterns and at the query's own position. RoPE on phi(q), phi(k) and the depth-wise LePE
convolution of v are the RAVLT block's positional parts and are not part of the mechanism.

Patterns. noncausal_self / noncausal_cross: exactly the above (self: qbar over the real tokens).
causal_self: qbar over all queries would leak the future, so key j is weighted when it arrives, by the
mean of the queries up to it: w_j = exp(scale * qbar_j . phi(k_j)), qbar_j = mean_{t <= j} phi(q_t), and
query i normalises over the keys it sees, alpha_ij = w_j / sum_{j' <= i} w_j'. This differs from the
paper only in using qbar_j instead of one global qbar; it fixes each key's weight once, so the state is
constant-size (buffer, normaliser, running query mean) and chunked calls equal one full call.
causal_cross: the formula with qbar_i = mean of queries 1..i (what query i may know) and a softmax over
all keys; each query then needs its own buffer, so this pattern costs O(Tq·Tk·D), like softmax.
alpha depends on the query head, so buffers and state are per query head (GQA saves no state).

Paths: ``associative`` (noncausal: the buffer once, O(T·D²)); ``chunk`` (causal_self: all chunks at
once, buffers carried across chunks by a cumulative sum or, for logits spanning > 60, a log-depth
rescaling scan); ``recurrent`` (causal_self token loop, for decoding); ``blocked`` (causal_cross).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ShapeError
from ..inputs import AttentionInputs
from ..mechanism import Complexity, Mechanism, Paper, Shape, fast_path, register_mechanism
from ..ops.gqa import group_queries, repeat_kv
from ..ops.masking import visibility
from ..ops.reference import compute_dtype
from ..ops.steps import RECURRENT_MAX_TOKENS, StepOutputs
from ..options import check_float, check_int
from ..patterns import ALL_PATTERNS, Pattern
from ..state import State


@dataclass(frozen=True)
class RalaOptions:
    eps: float = 1e-6  # added to phi(q).z, as in the authors' code
    chunk_size: int = 64  # tokens per chunk of the causal_self chunk path (speed only)
    block_size: int = 256  # queries per block of the causal_cross path (memory only)

    def __post_init__(self):
        check_float("rala", "eps", self.eps, positive=True)
        check_int("rala", "chunk_size", self.chunk_size)
        check_int("rala", "block_size", self.block_size)


@dataclass(frozen=True)
class RalaState(State):
    """causal_self state, per query head, relative to the reference logit m: w_j = exp(l_j - m)."""

    S: torch.Tensor  # [B, Hq, Dk, Dv] sum_j w_j phi(k_j) v_j^T
    z: torch.Tensor  # [B, Hq, Dk] sum_j w_j phi(k_j)
    Z: torch.Tensor  # [B, Hq] sum_j w_j: the running softmax normaliser
    m: torch.Tensor  # [B, Hq] the largest logit so far (>= 0; logits are >= 0 since phi > 0)
    q_sum: torch.Tensor  # [B, Hq, Dk] sum of phi(q) over the real tokens so far
    count: torch.Tensor  # [B] real tokens so far


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    return compute_dtype(dtype)


# the largest spread of reference logits one shared reference may cover: e^-60 is still a normal fp32
# number (the smallest is e^-87), so every scaled term keeps its full precision
SAFE_SPAN = {torch.float32: 60.0, torch.float64: 600.0}


def _nonzero(t: torch.Tensor) -> torch.Tensor:
    """``t`` with zeros replaced by 1: a row that sees no key divides 0 by 1 (a clamp to a tiny number
    would give 0/0 in the backward pass, whose d(x/y)/dy = -x/y^2 squares it to zero)."""
    return torch.where(t > 0, t, torch.ones_like(t))


def prefix_scan(m: torch.Tensor, S: torch.Tensor, Z: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Inclusive scan over the last axis of ``m, Z [..., n]`` (axis -3 of ``S [..., n, D, E]``) of buffers
    held relative to a reference logit m >= 0: (a, A) + (b, B) = (c, A e^(a-c) + B e^(b-c)), c = max(a, b).
    Hillis-Steele, ceil(log2 n) steps (each adds the element ``step`` places back; none there: weight 0)."""
    step = 1
    while step < m.shape[-1]:
        m_back = F.pad(m[..., :-step], (step, 0), value=float("-inf"))  # [..., n]
        top = torch.maximum(m, m_back)
        fa, fb = torch.exp(m - top), torch.exp(m_back - top)  # exp(<= 0); fb = 0 where nothing is back
        S = fa[..., None, None] * S + fb[..., None, None] * F.pad(S[..., :-step, :, :], (0, 0, 0, 0, step, 0))
        Z = fa * Z + fb * F.pad(Z[..., :-step], (step, 0))
        m, step = top, step * 2
    return m, S, Z


def buffers_before(m0, S0, Z0, mu, own, zeta) -> tuple[torch.Tensor, ...]:
    """The buffer before every chunk and after the last: element c of the results holds the state
    ``(m0 [...], S0 [..., D, E], Z0 [...])`` plus chunks 0..c-1, each given relative to its own reference
    ``mu [..., n]`` as ``own [..., n, D, E]``, ``zeta [..., n]``; returns ``m, Z [..., n+1]``, ``S [..., n+1, D, E]``.

    When the logits of the call span at most SAFE_SPAN, one shared reference keeps every factor a normal
    float and plain cumulative sums do (exact); otherwise the log-depth rescaling scan (exact, slower)."""
    top = mu.amax(-1)  # [...] the call's largest chunk reference
    span = top - torch.minimum(mu.amin(-1), m0)
    if bool((span <= SAFE_SPAN[mu.dtype]).all()):
        share = torch.exp(mu - top[..., None])  # [..., n] <= 1, >= e^-SAFE_SPAN
        A = F.pad((share[..., None, None] * own).cumsum(-3), (0, 0, 0, 0, 1, 0))  # [..., n+1, D, E] exclusive
        Az = F.pad((share * zeta).cumsum(-1), (1, 0))  # [..., n+1]
        m = torch.maximum(m0[..., None], F.pad(mu, (1, 0), value=float("-inf")).cummax(-1).values)  # [..., n+1]
        f0, f1 = torch.exp(m0[..., None] - m), torch.exp(top[..., None] - m)  # <= 1 and <= e^SAFE_SPAN
        return m, f0[..., None, None] * S0[..., None, :, :] + f1[..., None, None] * A, f0 * Z0[..., None] + f1 * Az
    return prefix_scan(torch.cat([m0[..., None], mu], -1), torch.cat([S0[..., None, :, :], own], -3),
                       torch.cat([Z0[..., None], zeta], -1))  # fmt: skip


@register_mechanism("rala")
class Rala(Mechanism):
    family = "kernel"
    paper = Paper("Breaking the Low-Rank Dilemma of Linear Attention", 2024, "2411.07635")
    patterns = ALL_PATTERNS
    exact = False
    trainable = True  # the output gate W_h, b_h
    state_kind = RalaState
    complexity = Complexity(time="O(T·D²) (causal_cross: O(Tq·Tk·D))", memory="O(T·D) (state O(Hq·D²))")
    Options = RalaOptions
    example_options = ({}, {"chunk_size": 16, "block_size": 64})

    def __init__(self, heads: int | None = None, head_dim: int | None = None, **options):
        super().__init__(heads, head_dim, **options)
        bound = 1.0 / math.sqrt(head_dim)  # nn.Linear's default initialisation
        self.gate_weight = nn.Parameter(torch.empty(heads, head_dim, head_dim).uniform_(-bound, bound))
        self.gate_bias = nn.Parameter(torch.empty(heads, head_dim).uniform_(-bound, bound))

    def check_call(self, x: AttentionInputs) -> None:
        super().check_call(x)
        dk, dv = x.q.shape[-1], x.v.shape[-1]
        if dk != self.head_dim or dv != self.head_dim:
            raise ShapeError(f"rala was created for head_dim={self.head_dim} (its output gate maps q to v's width);"
                             f" got q/k head dim {dk} and v head dim {dv}")  # fmt: skip

    # ---- pieces shared by every path ----------------------------------------------------------------

    @staticmethod
    def _compute(x: AttentionInputs) -> torch.dtype:
        return compute_dtype(x.q.dtype)

    @staticmethod
    def _phi(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return F.elu(t.to(dtype)) + 1.0

    def _gate(self, x: AttentionInputs, dtype: torch.dtype) -> torch.Tensor:
        """The output rank augmentation q_i W_h + b_h: ``[B, Tq, Hq, Dv]``."""
        w, b = self.gate_weight.to(dtype), self.gate_bias.to(dtype)
        return torch.einsum("bthd,hde->bthe", x.q.to(dtype), w) + b

    def _real(self, x: AttentionInputs, dtype: torch.dtype) -> torch.Tensor:
        """1 for real tokens, 0 for padding: ``[B, Tk]``."""
        if x.key_padding_mask is None:
            return torch.ones(x.batch, x.tk, dtype=dtype, device=x.q.device)
        return x.key_padding_mask.to(dtype)

    def _start(self, x: AttentionInputs, dtype: torch.dtype) -> RalaState:
        if x.state is not None:
            return x.state.to(dtype)
        return self.init_state(x.batch, x.kv_heads, x.q.shape[-1], x.v.shape[-1], device=x.q.device, dtype=dtype)

    # ---- the specification -------------------------------------------------------------------------

    def reference(self, x: AttentionInputs):
        dt = self._compute(x)
        fq = self._phi(x.q, dt)  # [B, Tq, H, D]
        fk = repeat_kv(self._phi(x.k, dt), x.groups)  # [B, Tk, H, D]
        v = repeat_kv(x.v.to(dt), x.groups)  # [B, Tk, H, Dv]
        tq, tk = x.tq, x.tk
        st = self._start(x, dt)
        real = self._real(x, dt)  # [B, Tk]
        if x.pattern is Pattern.NONCAUSAL_SELF:  # one global query mean over the real tokens
            qbar = torch.einsum("bt,bthd->bhd", real, fq) / real.sum(1).clamp(min=1)[:, None, None]
            logits = x.scale * torch.einsum("bhd,bkhd->bhk", qbar, fk)[:, :, None, :]  # [B, H, 1, Tk]
        elif x.pattern is Pattern.NONCAUSAL_CROSS:  # one global query mean over all queries
            logits = x.scale * torch.einsum("bhd,bkhd->bhk", fq.mean(1), fk)[:, :, None, :]  # [B, H, 1, Tk]
        elif x.pattern is Pattern.CAUSAL_SELF:  # key j: the mean of the real queries up to j (and the state's)
            upto = torch.ones(tk, tk, dtype=dt, device=fq.device).tril()[None] * real[:, None, :]  # [B, j, t]
            q_sum = st.q_sum[:, None] + torch.einsum("bjt,bthd->bjhd", upto, fq)  # [B, Tk, H, D]
            count = st.count[:, None] + upto.sum(-1)  # [B, Tk]
            qbar = q_sum / count.clamp(min=1)[:, :, None, None]
            logits = x.scale * torch.einsum("bkhd,bkhd->bhk", qbar, fk)[:, :, None, :]  # [B, H, 1, Tk]
        else:  # causal_cross: query i, the mean of queries 1..i
            qbar = fq.cumsum(1) / torch.arange(1, tq + 1, dtype=dt, device=fq.device)[None, :, None, None]
            logits = x.scale * torch.einsum("bqhd,bkhd->bhqk", qbar, fk)  # [B, H, Tq, Tk]
        logits = logits.expand(x.batch, x.heads, tq, tk)
        seen = visibility(x)  # [B|1, 1, Tq, Tk] or None
        if seen is not None:
            logits = logits.masked_fill(~seen, float("-inf"))
        # alpha_ij = exp(l_ij) / (sum_j' exp(l_ij') + the state's keys), stabilised by the largest logit
        r = torch.maximum(logits.amax(-1), st.m[:, :, None]).detach()  # [B, H, Tq]
        w = torch.exp(logits - r[..., None])  # [B, H, Tq, Tk]
        past = torch.exp(st.m[:, :, None] - r)  # [B, H, Tq] scale of the state's weights
        Z = _nonzero(w.sum(-1) + past * st.Z[:, :, None])  # [B, H, Tq]; no key seen: alpha = 0
        alpha, beta = w / Z[..., None], past / Z  # [B, H, Tq, Tk], [B, H, Tq]
        a = alpha * torch.einsum("bqhd,bkhd->bhqk", fq, fk)  # alpha_ij phi(q_i).phi(k_j)
        num = torch.einsum("bhqk,bkhe->bqhe", a, v)  # [B, Tq, H, Dv]
        num = num + beta.transpose(1, 2)[..., None] * torch.einsum("bqhd,bhde->bqhe", fq, st.S)
        den = a.sum(-1) + beta * torch.einsum("bqhd,bhd->bhq", fq, st.z)  # [B, H, Tq]
        out = num / (den.transpose(1, 2)[..., None] + self.options.eps)
        out = out * self._gate(x, dt)  # [B, Tq, H, Dv]
        new_state = self._reference_state(x, st, logits[:, :, -1], fq, fk, v, real) if x.want_state else None
        return out.to(x.q.dtype), new_state

    def _reference_state(self, x, st: RalaState, lk, fq, fk, v, real) -> RalaState:
        """After the call: every real key j with weight exp(l_j - m), m the largest logit so far."""
        m = torch.maximum(st.m, lk.amax(-1)).detach()  # [B, H]
        wk = torch.exp(lk - m[..., None])  # [B, H, Tk]; padded keys: 0
        keep = torch.exp(st.m - m)  # [B, H] rescales what the state held
        return RalaState(
            offset=st.offset + x.tq,
            S=keep[..., None, None] * st.S + torch.einsum("bhk,bkhd,bkhe->bhde", wk, fk, v),
            z=keep[..., None] * st.z + torch.einsum("bhk,bkhd->bhd", wk, fk),
            Z=keep * st.Z + wk.sum(-1),
            m=m,
            q_sum=st.q_sum + torch.einsum("bt,bthd->bhd", real, fq),
            count=st.count + real.sum(1),
        )

    # ---- fast paths --------------------------------------------------------------------------------

    @fast_path("associative", priority=10)
    def associative(self, x: AttentionInputs):
        """Noncausal: the weighted buffer S = sum_j alpha_j phi(k_j) [v_j, 1]^T once, then phi(Q) S."""
        dt = self._compute(x)
        fq = group_queries(self._phi(x.q, dt), x.kv_heads).permute(0, 2, 3, 1, 4)  # [B, Hkv, G, Tq, D]
        fk = self._phi(x.k, dt).transpose(1, 2)[:, :, None]  # [B, Hkv, 1, Tk, D]
        v = x.v.to(dt)
        v1 = torch.cat([v, torch.ones_like(v[..., :1])], -1).transpose(1, 2)[:, :, None]  # [B, Hkv, 1, Tk, Dv+1]
        if x.pattern is Pattern.NONCAUSAL_SELF:
            real = self._real(x, dt)  # [B, T]
            qbar = torch.einsum("bt,bhgtd->bhgd", real, fq) / real.sum(1).clamp(min=1)[:, None, None, None]
        else:
            qbar = fq.mean(3)  # [B, Hkv, G, D]
        logits = x.scale * (qbar[:, :, :, None] * fk).sum(-1)  # [B, Hkv, G, Tk]
        if x.key_padding_mask is not None:
            logits = logits.masked_fill(~x.key_padding_mask[:, None, None], float("-inf"))
        w = torch.exp(logits - logits.amax(-1, keepdim=True).clamp(min=0).detach())  # logits >= 0 when real
        alpha = w / _nonzero(w.sum(-1, keepdim=True))  # [B, Hkv, G, Tk]
        buf = (fk * alpha[..., None]).transpose(-1, -2) @ v1  # [B, Hkv, G, D, Dv+1]
        out = fq @ buf  # [B, Hkv, G, Tq, Dv+1]
        out = out[..., :-1] / (out[..., -1:] + self.options.eps)
        out = out.flatten(1, 2).transpose(1, 2)  # [B, Tq, Hq, Dv]
        return (out * self._gate(x, dt)).to(x.q.dtype), None

    @associative.unsupported
    def associative(self, x: AttentionInputs) -> list[str]:
        return [] if not x.pattern.is_causal else [f"associative is for noncausal patterns; got {x.pattern.value}"]

    @fast_path("chunk", priority=10)
    def chunk(self, x: AttentionInputs):
        """causal_self in chunks of C tokens, all chunks at once: each chunk's buffer relative to its own
        largest logit, carried across chunks (the state enters as element 0) by a cumulative sum against one
        shared reference logit, or by a log-depth rescaling scan when the logits span more than SAFE_SPAN
        (then every factor is exp(<= 0)); then the masked C x C form inside every chunk with per-row
        reference logits."""
        dt = self._compute(x)
        b, t, hq, d = x.q.shape
        hkv, g, dv = x.kv_heads, x.groups, x.v.shape[-1]
        st = self._start(x, dt)
        fq, fk = self._phi(x.q, dt), self._phi(x.k, dt)  # [B, T, Hq, D], [B, T, Hkv, D]
        real = self._real(x, dt)  # [B, T]
        q_sum = st.q_sum[:, None] + (fq * real[:, :, None, None]).cumsum(1)  # [B, T, Hq, D] running sums
        count = st.count[:, None] + real.cumsum(1)  # [B, T]
        qbar = group_queries(q_sum / count.clamp(min=1)[:, :, None, None], hkv)  # [B, T, Hkv, G, D]
        lk = x.scale * (qbar * fk[:, :, :, None]).sum(-1)  # [B, T, Hkv, G] logit of key j
        if x.key_padding_mask is not None:
            lk = lk.masked_fill(~x.key_padding_mask[:, :, None, None], float("-inf"))
        c = min(self.options.chunk_size, t)
        n, pad = -(-t // c), -t % c  # chunks; tokens padding the last one (logit -inf: weight 0)
        lc = F.pad(lk.permute(0, 2, 3, 1), (0, pad), value=float("-inf")).view(b, hkv, g, n, c)
        qc = F.pad(group_queries(fq, hkv).permute(0, 2, 3, 1, 4), (0, 0, 0, pad)).view(b, hkv, g, n, c, d)
        kc = F.pad(fk.transpose(1, 2), (0, 0, 0, pad)).view(b, hkv, 1, n, c, d)
        v = x.v.to(dt)
        v1 = torch.cat([v, torch.ones_like(v[..., :1])], -1).transpose(1, 2)  # [B, Hkv, T, Dv+1]: [v, 1]
        vc = F.pad(v1, (0, 0, 0, pad)).view(b, hkv, 1, n, c, dv + 1)
        mu = lc.amax(-1).clamp(min=0).detach()  # [B, Hkv, G, n] each chunk's reference logit
        wk = torch.exp(lc - mu[..., None])  # [B, Hkv, G, n, C]
        own = (kc * wk[..., None]).transpose(-1, -2) @ vc  # [B, Hkv, G, n, D, Dv+1] the chunk's buffer
        S0 = torch.cat([st.S, st.z[..., None]], -1).view(b, hkv, g, d, dv + 1)  # the state's buffer and z
        m, S, Z = buffers_before(st.m.view(b, hkv, g), S0, st.Z.view(b, hkv, g), mu, own, wk.sum(-1))
        m_in, S_in, Z_in = m[..., :-1, None], S[..., :-1, :, :], Z[..., :-1, None]  # before each chunk
        r = torch.maximum(m_in, lc.cummax(-1).values)  # [B, Hkv, G, n, C] per-query reference logit
        later = torch.ones(c, c, dtype=torch.bool, device=fq.device).triu(1)  # j > i inside a chunk
        w = (lc[..., None, :] - r[..., :, None]).masked_fill(later, float("-inf")).exp()  # [.., n, C, C]
        past = torch.exp(m_in - r)  # [B, Hkv, G, n, C] scale of the buffer before the chunk
        num = ((qc @ kc.transpose(-1, -2)) * w) @ vc + past[..., None] * (qc @ S_in)  # [.., n, C, Dv+1]
        Zi = w.sum(-1) + past * Z_in  # [B, Hkv, G, n, C]
        out = num[..., :dv] / _nonzero(num[..., dv:] + self.options.eps * Zi[..., None])
        out = out.reshape(b, hq, n * c, dv)[:, :, :t].transpose(1, 2)  # [B, T, Hq, Dv]
        out = (out * self._gate(x, dt)).to(x.q.dtype)
        if not x.want_state:
            return out, None
        S = S[..., -1, :, :].reshape(b, hq, d, dv + 1)
        new = RalaState(offset=st.offset + t, S=S[..., :dv], z=S[..., dv], Z=Z[..., -1].reshape(b, hq),
                        m=m[..., -1].reshape(b, hq), q_sum=q_sum[:, -1], count=count[:, -1])  # fmt: skip
        return out, new

    @chunk.unsupported
    def chunk(self, x: AttentionInputs) -> list[str]:
        return [] if x.pattern is Pattern.CAUSAL_SELF else [f"chunk is for causal_self; got {x.pattern.value}"]

    @fast_path("recurrent", priority=lambda mech, x: 20 if x.tq <= RECURRENT_MAX_TOKENS else 0)
    def recurrent(self, x: AttentionInputs):
        """The RNN form, one token at a time (decoding): the running query mean gives the key's logit l,
        then m' = max(m, l), S' = e^(m-m') S + e^(l-m') phi(k) [v, 1]^T, Z' = e^(m-m') Z + e^(l-m')."""
        dt = self._compute(x)
        b, t, hq, d = x.q.shape
        hkv, g, dv = x.kv_heads, x.groups, x.v.shape[-1]
        st = self._start(x, dt)
        fq, fk = group_queries(self._phi(x.q, dt), hkv), self._phi(x.k, dt)  # [B, T, Hkv, G, D], [B, T, Hkv, D]
        v = x.v.to(dt)
        v1 = torch.cat([v, torch.ones_like(v[..., :1])], -1)  # [B, T, Hkv, Dv+1]
        real = self._real(x, dt)  # [B, T]
        S = torch.cat([st.S, st.z[..., None]], -1).view(b, hkv, g, d, dv + 1)
        Z, m, q_sum, count = st.Z.view(b, hkv, g), st.m.view(b, hkv, g), st.q_sum.view(b, hkv, g, d), st.count
        outs = StepOutputs(t)
        for i in range(t):
            q_sum, count = q_sum + real[:, i, None, None, None] * fq[:, i], count + real[:, i]
            lk = x.scale * (q_sum * fk[:, i, :, None]).sum(-1) / count.clamp(min=1)[:, None, None]  # [B, Hkv, G]
            lk = lk.masked_fill(real[:, i, None, None] == 0, float("-inf"))
            top = torch.maximum(m, lk).detach()
            keep, w = torch.exp(m - top), torch.exp(lk - top)
            kv = fk[:, i, :, None, :, None] * v1[:, i, :, None, None, :]  # [B, Hkv, 1, D, Dv+1]
            S, Z, m = keep[..., None, None] * S + w[..., None, None] * kv, keep * Z + w, top
            num = (fq[:, i, :, :, None, :] @ S)[..., 0, :]  # [B, Hkv, G, Dv+1]
            outs.add(i, num[..., :dv] / _nonzero(num[..., dv:] + self.options.eps * Z[..., None]))
        out = outs.stacked().flatten(2, 3)  # [B, T, Hq, Dv]
        out = (out * self._gate(x, dt)).to(x.q.dtype)
        if not x.want_state:
            return out, None
        S = S.reshape(b, hq, d, dv + 1)
        new = RalaState(offset=st.offset + t, S=S[..., :dv], z=S[..., dv], Z=Z.reshape(b, hq), m=m.reshape(b, hq),
                        q_sum=q_sum.reshape(b, hq, d), count=count)  # fmt: skip
        return out, new

    @recurrent.unsupported
    def recurrent(self, x: AttentionInputs) -> list[str]:
        return [] if x.pattern is Pattern.CAUSAL_SELF else [f"recurrent is for causal_self; got {x.pattern.value}"]

    @fast_path("blocked", priority=10)
    def blocked(self, x: AttentionInputs):
        """causal_cross in blocks of queries: each query's own softmax over the keys, O(block x Tk) memory."""
        dt = self._compute(x)
        hkv, dv = x.kv_heads, x.v.shape[-1]
        fq = group_queries(self._phi(x.q, dt), hkv).permute(0, 2, 3, 1, 4)  # [B, Hkv, G, Tq, D]
        steps = torch.arange(1, x.tq + 1, dtype=dt, device=fq.device)[:, None]
        qbar = fq.cumsum(3) / steps  # [B, Hkv, G, Tq, D] mean of queries 1..i
        fk = self._phi(x.k, dt).transpose(1, 2)[:, :, None]  # [B, Hkv, 1, Tk, D]
        v = x.v.to(dt)
        v1 = torch.cat([v, torch.ones_like(v[..., :1])], -1).transpose(1, 2)[:, :, None]  # [B, Hkv, 1, Tk, Dv+1]
        pad = None if x.key_padding_mask is None else ~x.key_padding_mask[:, None, None, None, :]
        outs, bs = [], self.options.block_size
        for s in range(0, x.tq, bs):
            logits = x.scale * (qbar[..., s : s + bs, :] @ fk.transpose(-1, -2))  # [B, Hkv, G, n, Tk]
            if pad is not None:
                logits = logits.masked_fill(pad, float("-inf"))
            w = torch.exp(logits - logits.amax(-1, keepdim=True).clamp(min=0).detach())  # logits >= 0 when real
            alpha = w / _nonzero(w.sum(-1, keepdim=True))
            num = (alpha * (fq[..., s : s + bs, :] @ fk.transpose(-1, -2))) @ v1  # [B, Hkv, G, n, Dv+1]
            outs.append(num[..., :dv] / (num[..., dv:] + self.options.eps))
        out = torch.cat(outs, dim=-2).flatten(1, 2).transpose(1, 2)  # [B, Tq, Hq, Dv]
        return (out * self._gate(x, dt)).to(x.q.dtype), None

    @blocked.unsupported
    def blocked(self, x: AttentionInputs) -> list[str]:
        return [] if x.pattern is Pattern.CAUSAL_CROSS else [f"blocked is for causal_cross; got {x.pattern.value}"]

    # ---- state -------------------------------------------------------------------------------------

    def empty_state(self, batch, kv_heads, dk, dv, *, device=None, dtype=torch.float32) -> RalaState:
        dt, h = _state_dtype(dtype), self.heads

        def zeros(*shape):
            return torch.zeros(*shape, device=device, dtype=dt)

        return RalaState(offset=0, S=zeros(batch, h, dk, dv), z=zeros(batch, h, dk), Z=zeros(batch, h),
                         m=zeros(batch, h), q_sum=zeros(batch, h, dk), count=zeros(batch))  # fmt: skip

    def check_state(self, state: State, k: torch.Tensor, v: torch.Tensor) -> None:
        want = (k.shape[0], self.heads, k.shape[-1], v.shape[-1])
        got = tuple(state.S.shape)
        state.check_fits("batch, heads, dk, dv", got, want, k.device)

    def state_bytes(self, shape: Shape, dtype: torch.dtype = torch.float32) -> int:
        per_head = shape.dk * shape.dv + 2 * shape.dk + 2  # S, z and q_sum, Z and m
        elt = torch.empty(0, dtype=_state_dtype(dtype)).element_size()
        return shape.batch * (shape.heads * per_head + 1) * elt

    # ---- costs -------------------------------------------------------------------------------------

    def flops(self, shape: Shape, pattern: Pattern) -> float:
        d, dv1 = shape.dk, shape.dv + 1
        gate = 2.0 * shape.tq * d * shape.dv
        if pattern is Pattern.CAUSAL_CROSS:  # logits, kernel and weighted sum for every (query, key) pair
            per_head = 2.0 * shape.tq * shape.tk * (2 * d + dv1)
        elif pattern is Pattern.CAUSAL_SELF:
            c = min(self.options.chunk_size, shape.tq)
            per_head = 2.0 * shape.tq * (d + c * (d + dv1) / 2 + 2 * d * dv1)  # logits, intra, inter + state
        else:
            per_head = 2.0 * shape.tk * d * (1 + dv1) + 2.0 * shape.tq * d * dv1  # logits + buffer, read
        return shape.batch * shape.heads * (per_head + gate)
