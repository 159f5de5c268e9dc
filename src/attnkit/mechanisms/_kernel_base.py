"""``KernelAttention``: the shared machinery of kernelized (linear) attention, with optional decay.

    out_i = sum_j w_ij phi(q_i).phi(k_j) v_j  /  (sum_j w_ij phi(q_i).phi(k_j) + eps)      (normalised)
    out_i = sum_j w_ij phi(q_i).phi(k_j) v_j                                           (not normalised)

with the sums over the keys query i sees, and ``w_ij = g^(i-j)`` (causal) or ``g^|i-j|`` (noncausal
self) for a per-head decay g, or 1. A subclass supplies the feature map ``phi`` (which may depend on
positions or parameters) and, for the decay family, ``log_decay``; this class supplies the reference
(the quadratic form, written out), the ``associative`` path phi(Q)(phi(K)^T V) for noncausal patterns,
the ``bidirectional`` decayed scan, the ``chunk`` path (Lightning Attention-2 tiling) and the
token-by-token ``recurrent`` path for causal_self, and the recurrent state (S, z).
The normaliser rides along as an extra value column of ones, so one scan computes both.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from ..inputs import AttentionInputs
from ..mechanism import Mechanism, Shape, fast_path
from ..ops.chunked import DEFAULT_CHUNK, bidirectional_linear_scan, causal_linear_scan
from ..ops.gqa import group_queries, repeat_kv
from ..ops.masking import visibility
from ..ops.reference import compute_dtype
from ..ops.steps import RECURRENT_MAX_TOKENS, StepOutputs
from ..patterns import Pattern
from ..state import RecurrentState


class KernelAttention(Mechanism):
    """Base of kernel (and decayed linear) attention mechanisms; not registered itself."""

    state_kind = RecurrentState
    normalised: ClassVar[bool] = True  # divide by phi(q).z + eps
    decays: ClassVar[bool] = False  # has a per-head decay (log_decay returns a tensor)

    # ---- what a subclass provides ------------------------------------------------------------------

    def features(self, x: AttentionInputs, role: str) -> torch.Tensor:
        """phi of ``x.q`` (role "q", ``[B, Tq, Hq, F]``) or ``x.k`` (role "k", ``[B, Tk, Hkv, F]``), in
        fp32 (fp64 for fp64 inputs). ``self.positions(x, role)`` gives absolute token positions."""
        raise NotImplementedError

    def log_decay(self, x: AttentionInputs) -> torch.Tensor | None:
        """Per kv-head ``log g`` ``[Hkv]`` (<= 0), or None for no decay."""
        return None

    def eps(self) -> float:
        return getattr(self.options, "eps", 1e-6)

    def chunk_size(self) -> int:
        return getattr(self.options, "chunk_size", DEFAULT_CHUNK)

    # ---- helpers -----------------------------------------------------------------------------------

    @staticmethod
    def compute_dtype(x: AttentionInputs) -> torch.dtype:
        return compute_dtype(x.q.dtype)

    @staticmethod
    def positions(x: AttentionInputs, role: str) -> torch.Tensor:
        """Absolute positions ``[T]``: self patterns continue after the state's tokens; cross patterns
        number queries and keys each from 0."""
        t = x.tq if role == "q" else x.tk
        start = x.state.offset if (x.state is not None and x.pattern.is_self) else 0
        return torch.arange(start, start + t, device=x.q.device)

    def _phi_k(self, x: AttentionInputs) -> torch.Tensor:
        """phi(k) with padded keys zeroed: they add nothing to sums or states."""
        k = self.features(x, "k")
        if x.key_padding_mask is not None:
            k = k * x.key_padding_mask[:, :, None, None].to(k.dtype)
        return k

    def _values(self, x: AttentionInputs, dtype: torch.dtype) -> torch.Tensor:
        """``v``, with a column of ones appended when normalised (it accumulates the normaliser)."""
        v = x.v.to(dtype)
        return torch.cat([v, torch.ones_like(v[..., :1])], dim=-1) if self.normalised else v

    def _finish(self, out: torch.Tensor, x: AttentionInputs) -> torch.Tensor:
        if self.normalised:
            out = out[..., :-1] / (out[..., -1:] + self.eps())
        return out.to(x.q.dtype).contiguous()

    def _initial(self, x: AttentionInputs, dtype: torch.dtype) -> torch.Tensor | None:
        st = x.state
        if st is None:
            return None
        return (torch.cat([st.S, st.z[..., None]], dim=-1) if self.normalised else st.S).to(dtype)

    def _new_state(self, x: AttentionInputs, final: torch.Tensor) -> RecurrentState:
        final = final.float()
        offset = x.tq + (x.state.offset if x.state is not None else 0)
        if self.normalised:
            return RecurrentState(offset=offset, S=final[..., :-1], z=final[..., -1])
        return RecurrentState(offset=offset, S=final, z=None)

    def empty_state(self, batch, kv_heads, dk, dv, *, device=None, dtype=torch.float32) -> RecurrentState:
        return RecurrentState.zeros(batch, kv_heads, self.state_dk(dk), dv, normalised=self.normalised, device=device)

    # ---- the specification -------------------------------------------------------------------------

    def reference(self, x: AttentionInputs):
        q, k = self.features(x, "q"), self.features(x, "k")  # [B, Tq, Hq, F], [B, Tk, Hkv, F]
        v = x.v.to(q.dtype)
        a = torch.einsum("bqhf,bkhf->bhqk", q, repeat_kv(k, x.groups))  # [B, H, Tq, Tk] phi(q_i).phi(k_j)
        seen = visibility(x)  # pattern and padding
        if seen is not None:
            a = a * seen
        log_g = self.log_decay(x)  # [Hkv] or None
        log_g_h = None if log_g is None else log_g.to(q.dtype).repeat_interleave(x.groups)  # [H]
        if log_g_h is not None:  # w_ij = g^(i-j) causal, g^|i-j| noncausal
            i = torch.arange(x.tq, device=q.device, dtype=q.dtype)[:, None]
            j = torch.arange(x.tk, device=q.device, dtype=q.dtype)[None, :]
            dist = (i - j).clamp(min=0) if x.pattern is Pattern.CAUSAL_SELF else (i - j).abs()  # [Tq, Tk]
            a = a * torch.exp(log_g_h[:, None, None] * dist)
        out = torch.einsum("bhqk,bkhe->bqhe", a, repeat_kv(v, x.groups))  # [B, Tq, H, Dv]
        den = a.sum(-1).transpose(1, 2)[..., None]  # [B, Tq, H, 1]
        st = x.state
        if st is not None:  # what earlier chunks left in the state, decayed by g^(i+1) to query i
            carry = 1.0
            if log_g_h is not None:
                steps = torch.arange(1, x.tq + 1, device=q.device, dtype=q.dtype)[:, None, None]  # [Tq, 1, 1]
                carry = torch.exp(log_g_h[None, :, None] * steps)  # [Tq, H, 1]
            S = st.S.repeat_interleave(x.groups, 1).to(q.dtype)  # [B, H, F, Dv]
            out = out + carry * torch.einsum("bqhf,bhfe->bqhe", q, S)
            if self.normalised:
                z = st.z.repeat_interleave(x.groups, 1).to(q.dtype)  # [B, H, F]
                den = den + carry * torch.einsum("bqhf,bhf->bqh", q, z)[..., None]
        if self.normalised:
            out = out / (den + self.eps())
        new_state = self._reference_state(x, k, v, log_g) if x.want_state else None
        return out.to(x.q.dtype), new_state

    def _reference_state(self, x, k, v, log_g) -> RecurrentState:
        """S_T = g^T S_0 + sum_j g^(T-1-j) phi(k_j) v_j^T, z likewise (padded keys excluded)."""
        if x.key_padding_mask is not None:
            k = k * x.key_padding_mask[:, :, None, None].to(k.dtype)
        if log_g is not None:  # weight of key j at the end of the call: g^(Tk-1-j)
            age = (x.tk - 1 - torch.arange(x.tk, device=k.device))[:, None]  # [Tk, 1]
            k = k * torch.exp(log_g.to(k.dtype)[None, :] * age)[None, :, :, None]
        S = torch.einsum("bkhf,bkhe->bhfe", k, v).float()  # [B, Hkv, F, Dv]
        z = k.sum(1).float() if self.normalised else None  # [B, Hkv, F]
        st = x.state
        if st is not None:
            total = 1.0 if log_g is None else torch.exp(log_g.float() * x.tk)[None, :, None]  # g^Tk: [1, Hkv, 1]
            S = S + (total if log_g is None else total[..., None]) * st.S
            z = z + total * st.z if self.normalised else None
        return RecurrentState(offset=x.tq + (st.offset if st else 0), S=S, z=z)

    # ---- fast paths --------------------------------------------------------------------------------

    @fast_path("associative", priority=10, when=lambda cls: not cls.decays)
    def associative(self, x: AttentionInputs):
        q, k = self.features(x, "q"), self._phi_k(x)
        kv = torch.einsum("bkhf,bkhe->bhfe", k, self._values(x, q.dtype))  # [B, Hkv, F, Dv(+1)]: all keys once
        out = torch.einsum("bqhgf,bhfe->bqhge", group_queries(q, x.kv_heads), kv)  # [B, Tq, Hkv, G, Dv(+1)]
        return self._finish(out.flatten(2, 3), x), None

    @associative.unsupported
    def associative(self, x: AttentionInputs) -> list[str]:
        return ["causal_self needs the chunk path"] if x.pattern is Pattern.CAUSAL_SELF else []

    @fast_path("bidirectional", priority=10, when=lambda cls: cls.decays)
    def bidirectional(self, x: AttentionInputs):
        q, k = self.features(x, "q"), self._phi_k(x)
        out = bidirectional_linear_scan(
            q, k, self._values(x, q.dtype), chunk=self.chunk_size(), log_decay=self.log_decay(x)
        )
        return self._finish(out, x), None

    @bidirectional.unsupported
    def bidirectional(self, x: AttentionInputs) -> list[str]:
        ok = x.pattern is Pattern.NONCAUSAL_SELF
        return [] if ok else [f"bidirectional is for noncausal_self; got {x.pattern.value}"]

    @fast_path("chunk", priority=10)
    def chunk(self, x: AttentionInputs):
        q, k = self.features(x, "q"), self._phi_k(x)
        out, final = causal_linear_scan(q, k, self._values(x, q.dtype), self._initial(x, q.dtype),
                                        chunk=self.chunk_size(), log_decay=self.log_decay(x))  # fmt: skip
        return self._finish(out, x), (self._new_state(x, final) if x.want_state else None)

    @chunk.unsupported
    def chunk(self, x: AttentionInputs) -> list[str]:
        return [] if x.pattern is Pattern.CAUSAL_SELF else [f"chunk is for causal_self; got {x.pattern.value}"]

    @fast_path("recurrent", priority=lambda mech, x: 20 if x.tq <= RECURRENT_MAX_TOKENS else 0)
    def recurrent(self, x: AttentionInputs):
        """The RNN form, one token at a time: S_t = g S_{t-1} + phi(k_t) v_t^T, out_t = phi(q_t) S_t."""
        q, k = self.features(x, "q"), self._phi_k(x)
        v = self._values(x, q.dtype)
        log_g = self.log_decay(x)
        g = None if log_g is None else torch.exp(log_g.to(q.dtype))[None, :, None, None]  # [1, Hkv, 1, 1]
        S = self._initial(x, q.dtype)
        if S is None:
            S = torch.zeros(x.batch, x.kv_heads, k.shape[-1], v.shape[-1], dtype=q.dtype, device=q.device)
        outs = StepOutputs(x.tq)
        for t in range(x.tq):
            step = torch.einsum("bhf,bhe->bhfe", k[:, t], v[:, t])
            S = step + (S if g is None else g * S)
            outs.add(t, torch.einsum("bhgf,bhfe->bhge", group_queries(q[:, t : t + 1], x.kv_heads)[:, 0], S))
        out = outs.stacked().flatten(2, 3)  # [B, T, Hq, Dv(+1)]
        return self._finish(out, x), (self._new_state(x, S) if x.want_state else None)

    @recurrent.unsupported
    def recurrent(self, x: AttentionInputs) -> list[str]:
        return [] if x.pattern is Pattern.CAUSAL_SELF else [f"recurrent is for causal_self; got {x.pattern.value}"]

    # ---- costs -------------------------------------------------------------------------------------

    def state_dk(self, dk: int) -> int:
        """The feature dimension F of phi; subclasses with other widths override it."""
        return dk

    def flops(self, shape: Shape, pattern: Pattern) -> float:
        f, dv = self.state_dk(shape.dk), shape.dv + int(self.normalised)
        if pattern is Pattern.CAUSAL_SELF:
            c = min(self.chunk_size(), shape.tq)
            per_head = 2.0 * shape.tq * c * (f + dv) / 2 + 4.0 * shape.tq * f * dv  # intra + state and inter
            return shape.batch * shape.heads * per_head
        build = 2.0 * shape.tk * f * dv * shape.kv_heads
        read = 2.0 * shape.tq * f * dv * shape.heads
        return shape.batch * (build + read)
