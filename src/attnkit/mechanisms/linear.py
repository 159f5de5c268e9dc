"""Linear attention — Transformers are RNNs: Fast Autoregressive Transformers with Linear Attention
(Katharopoulos et al., 2020, arXiv:2006.16236).

    out_i = phi(q_i)^T S_i / (phi(q_i)^T z_i + eps),   S_i = sum_j phi(k_j) v_j^T,   z_i = sum_j phi(k_j)

with the sums over the keys query i sees (j <= i in causal_self). No softmax scale. The ``associative``
path computes phi(Q) (phi(K)^T V) for the noncausal patterns in O(T D^2); the ``chunk`` path is the
Lightning Attention-2 tiling for causal_self with O(T) memory and a constant-size recurrent state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..inputs import AttentionInputs
from ..mechanism import Complexity, Mechanism, Paper, Shape, fast_path, register_mechanism
from ..ops.chunked import DEFAULT_CHUNK, causal_linear_scan
from ..ops.feature_maps import FEATURE_MAPS
from ..ops.gqa import group_queries, repeat_kv
from ..ops.masking import visibility
from ..options import check_choice, check_float, check_int
from ..patterns import ALL_PATTERNS, Pattern
from ..state import RecurrentState


@dataclass(frozen=True)
class LinearOptions:
    feature_map: str = "elu1"  # phi: elu1 (elu(x) + 1), relu or identity
    eps: float = 1e-6  # added to the normaliser phi(q).z so it never divides by zero
    chunk_size: int = DEFAULT_CHUNK  # tokens per chunk of the causal chunk path (speed only)

    def __post_init__(self):
        check_choice("linear", "feature_map", self.feature_map, tuple(FEATURE_MAPS))
        check_float("linear", "eps", self.eps)
        check_int("linear", "chunk_size", self.chunk_size)


@register_mechanism("linear")
class Linear(Mechanism):
    family = "kernel"
    paper = Paper("Transformers are RNNs: Fast Autoregressive Transformers with Linear Attention", 2020, "2006.16236")
    patterns = ALL_PATTERNS
    exact = False
    uses_scale = False
    state_kind = RecurrentState
    complexity = Complexity(time="O(T·D²)", memory="O(T·D) (state O(D²))")
    Options = LinearOptions
    example_options = ({}, {"feature_map": "relu", "chunk_size": 16})
    fidelity_knob = ("feature_map", ("elu1", "relu"))

    def _phi(self, t: torch.Tensor) -> torch.Tensor:
        compute = torch.float64 if t.dtype == torch.float64 else torch.float32
        return FEATURE_MAPS[self.options.feature_map](t.to(compute))

    def reference(self, x: AttentionInputs):
        q = self._phi(x.q)  # [B, Tq, H, Dk]
        k_kv = self._phi(x.k)  # [B, Tk, Hkv, Dk]
        v_kv = x.v.to(q.dtype)
        k, v = repeat_kv(k_kv, x.groups), repeat_kv(v_kv, x.groups)  # [B, Tk, H, *]
        a = torch.einsum("bqhd,bkhd->bhqk", q, k)  # [B, H, Tq, Tk] unnormalised scores phi(q).phi(k)
        seen = visibility(x)
        if seen is not None:
            a = a * seen
        num = torch.einsum("bhqk,bkhe->bqhe", a, v)  # [B, Tq, H, Dv]
        den = a.sum(-1).transpose(1, 2)[..., None]  # [B, Tq, H, 1]
        st = x.state
        if st is not None:  # what earlier chunks contributed
            num = num + torch.einsum("bqhd,bhde->bqhe", q, st.S.repeat_interleave(x.groups, 1).to(q.dtype))
            den = den + torch.einsum("bqhd,bhd->bqh", q, st.z.repeat_interleave(x.groups, 1).to(q.dtype))[..., None]
        out = num / (den + self.options.eps)
        new_state = None
        if x.want_state:
            k_real = k_kv  # padded keys add nothing to the state
            if x.key_padding_mask is not None:
                k_real = k_kv * x.key_padding_mask[:, :, None, None].to(q.dtype)
            S = torch.einsum("bkhd,bkhe->bhde", k_real, v_kv).float()  # [B, Hkv, Dk, Dv]
            z = k_real.sum(1).float()  # [B, Hkv, Dk]
            offset = x.tq
            if st is not None:
                S, z, offset = S + st.S, z + st.z, offset + st.offset
            new_state = RecurrentState(offset=offset, S=S, z=z)
        return out.to(x.q.dtype), new_state

    def _augmented(self, x: AttentionInputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """phi(q), phi(k) with padded keys zeroed, and [v, 1]: the last column carries the normaliser."""
        q, k = self._phi(x.q), self._phi(x.k)
        if x.key_padding_mask is not None:
            k = k * x.key_padding_mask[:, :, None, None].to(k.dtype)
        v = x.v.to(q.dtype)
        v1 = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)  # [B, Tk, Hkv, Dv + 1]
        return q, k, v1

    def _normalise(self, out1: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return (out1[..., :-1] / (out1[..., -1:] + self.options.eps)).to(dtype).contiguous()

    @fast_path("associative", priority=10)
    def associative(self, x: AttentionInputs):
        q, k, v1 = self._augmented(x)
        kv = torch.einsum("bkhd,bkhe->bhde", k, v1)  # [B, Hkv, Dk, Dv+1]: all keys summed once
        out1 = torch.einsum("bqhgd,bhde->bqhge", group_queries(q, x.kv_heads), kv)  # [B, Tq, Hkv, G, Dv+1]
        return self._normalise(out1.flatten(2, 3), x.q.dtype), None

    @associative.unsupported
    def associative(self, x: AttentionInputs) -> list[str]:
        return ["causal_self needs the chunk path"] if x.pattern is Pattern.CAUSAL_SELF else []

    @fast_path("chunk", priority=10)
    def chunk(self, x: AttentionInputs):
        q, k, v1 = self._augmented(x)
        st = x.state
        s0 = None if st is None else torch.cat([st.S, st.z[..., None]], dim=-1).to(q.dtype)  # [B, Hkv, Dk, Dv+1]
        out1, final = causal_linear_scan(q, k, v1, s0, chunk=self.options.chunk_size)
        new_state = None
        if x.want_state:
            final = final.float()
            offset = x.tq + (st.offset if st is not None else 0)
            new_state = RecurrentState(offset=offset, S=final[..., :-1], z=final[..., -1])
        return self._normalise(out1, x.q.dtype), new_state

    @chunk.unsupported
    def chunk(self, x: AttentionInputs) -> list[str]:
        return [] if x.pattern is Pattern.CAUSAL_SELF else [f"chunk is for causal_self; got {x.pattern.value}"]

    def flops(self, shape: Shape, pattern: Pattern) -> float:
        dk, dv1 = shape.dk, shape.dv + 1
        if pattern is Pattern.CAUSAL_SELF:
            c = min(self.options.chunk_size, shape.tq)
            per_head = 2.0 * shape.tq * c * (dk + dv1) / 2 + 4.0 * shape.tq * dk * dv1  # intra + state/inter
            return shape.batch * shape.heads * per_head
        build = 2.0 * shape.tk * dk * dv1 * shape.kv_heads
        read = 2.0 * shape.tq * dk * dv1 * shape.heads
        return shape.batch * (build + read)
