"""Sigmoid attention — Theory, Analysis, and Best Practices for Sigmoid Self-Attention
(Ramapuram et al., 2024, arXiv:2409.04431).

    out_i = sum_j sigmoid(scale * q_i . k_j + b_i) v_j,     b_i = -log(n_i)

with n_i the number of keys query i can see (Tk, or i + 1 in causal_self; padded keys excluded),
unless a fixed ``bias`` is given. There is no row normaliser, so partial outputs over disjoint key
sets simply add. The ``blocked`` path never materialises T x T, forward or backward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..inputs import AttentionInputs
from ..kernels.triton import triton_reasons
from ..mechanism import Complexity, Mechanism, Paper, Shape, fast_path, register_mechanism
from ..ops.flops import causal_factor
from ..ops.gqa import repeat_kv
from ..ops.masking import visibility, visible_counts
from ..ops.reference import compute_dtype, upcast_qkv
from ..ops.tiled_sigmoid import tiled_sigmoid_attention
from ..options import check_float
from ..patterns import ALL_PATTERNS, Pattern
from ..state import KVCache


@dataclass(frozen=True)
class SigmoidOptions:
    bias: float | None = None  # b added to every score; None: -log(n), n = keys the query can see

    def __post_init__(self):
        check_float("sigmoid", "bias", self.bias, allow_none=True)


@register_mechanism("sigmoid")
class Sigmoid(Mechanism):
    family = "softmax-free"
    paper = Paper("Theory, Analysis, and Best Practices for Sigmoid Self-Attention", 2024, "2409.04431")
    patterns = ALL_PATTERNS
    exact = False  # not softmax; exact against its own reference
    heads_independent = True
    state_kind = KVCache
    complexity = Complexity(time="O(Tq·Tk·D)", memory="O(Tq + Tk) blocked (reference: O(Tq·Tk))")
    Options = SigmoidOptions
    example_options = ({}, {"bias": -2.0})
    fidelity_knob = ("bias", (None, -2.0))

    def reference(self, x: AttentionInputs):
        q, k, v = upcast_qkv(x)  # [B, T, H, D] in fp32 (fp64)
        compute = q.dtype
        seen = visibility(x)  # [B|1, 1, Tq, Tk] or None (every key visible)
        if self.options.bias is not None:
            bias = torch.tensor(self.options.bias, dtype=compute)
        else:
            n = seen.sum(-1, keepdim=True) if seen is not None else torch.tensor(x.tk)  # keys each query sees
            bias = -torch.log(n.to(compute).clamp(min=1))  # [B|1, 1, Tq, 1] or a scalar
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * x.scale + bias  # [B, H, Tq, Tk]
        weights = torch.sigmoid(scores)
        if seen is not None:
            weights = weights * seen  # keys it cannot see get weight 0
        out = torch.einsum("bhqk,bkhd->bqhd", weights, v)  # [B, Tq, H, Dv]
        return out.to(x.q.dtype), None

    @fast_path("blocked", priority=10)
    def blocked(self, x: AttentionInputs):
        compute = compute_dtype(x.q.dtype)
        b, tq, h, d = x.q.shape
        tk = x.tk

        def heads_first(t: torch.Tensor) -> torch.Tensor:  # [B, T, H, D] -> [B*H, T, D]
            return t.to(compute).transpose(1, 2).reshape(b * h, t.shape[1], t.shape[3])

        q = heads_first(x.q) * x.scale  # pre-scaled: s = q.k + bias
        k = heads_first(repeat_kv(x.k, x.groups))
        v = heads_first(repeat_kv(x.v, x.groups))
        bias = self._bias(x).to(compute).expand(b, tq)  # [B, Tq]
        bias = bias[:, None, :].expand(b, h, tq).reshape(b * h, tq)
        valid = None
        if x.key_padding_mask is not None:
            valid = x.key_padding_mask[:, None, :].expand(b, h, tk).reshape(b * h, tk)
        causal_offset = x.q_offset if x.pattern is Pattern.CAUSAL_SELF else None
        out = tiled_sigmoid_attention(q, k, v, bias, valid=valid, causal_offset=causal_offset)  # [B*H, Tq, Dv]
        out = out.view(b, h, tq, -1).transpose(1, 2)  # [B, Tq, H, Dv]
        return out.to(x.q.dtype).contiguous(), None

    @fast_path("triton", priority=20)
    def triton(self, x: AttentionInputs):
        from ..kernels.triton.sigmoid_attention import sigmoid_attention

        out = sigmoid_attention(x.q, x.k, x.v, self._bias(x), scale=x.scale, valid=x.key_padding_mask,
                                causal_offset=x.q_offset if x.pattern is Pattern.CAUSAL_SELF else None)  # fmt: skip
        return out, None

    @triton.unsupported
    def triton(self, x: AttentionInputs) -> list[str]:
        reasons = triton_reasons(x.q)
        if max(x.q.shape[-1], x.v.shape[-1]) > 256:
            reasons.append(f"head dims up to 256; got {x.q.shape[-1]} and {x.v.shape[-1]}")
        if x.q.dtype == torch.float64:
            reasons.append("float64 is not supported by the kernel")
        return reasons

    def _bias(self, x: AttentionInputs) -> torch.Tensor:
        """The bias of each query ``[B|1, Tq]``: the option, or -log(keys it sees)."""
        if self.options.bias is not None:
            return torch.full((1, x.tq), float(self.options.bias), device=x.q.device)
        return -torch.log(visible_counts(x).clamp(min=1))

    def flops(self, shape: Shape, pattern: Pattern) -> float:
        per_head = 2.0 * shape.tq * shape.tk * (shape.dk + shape.dv)
        return shape.batch * shape.heads * per_head * causal_factor(shape, pattern)
