"""Softmax attention — Attention Is All You Need (Vaswani et al., 2017, arXiv:1706.03762).

    out = softmax(scale * q k^T + mask) v,      scale = 1 / sqrt(Dk)

The reference writes the masked softmax out; the ``sdpa`` path calls PyTorch's fused kernel
(FlashAttention-style on CPU and GPU) on the ``[B, T, H, D]`` layout without copies.
"""

from __future__ import annotations

from ..inputs import AttentionInputs
from ..mechanism import Complexity, Mechanism, Paper, Shape, fast_path, register_mechanism
from ..ops.flops import causal_factor
from ..ops.reference import dense_softmax_attention
from ..ops.sdpa import masked_sdpa
from ..patterns import ALL_PATTERNS, Pattern
from ..state import KVCache


@register_mechanism("softmax")
class Softmax(Mechanism):
    family = "softmax"
    paper = Paper("Attention Is All You Need", 2017, "1706.03762")
    patterns = ALL_PATTERNS
    exact = True
    heads_independent = True
    state_kind = KVCache
    complexity = Complexity(time="O(Tq·Tk·D)", memory="O(Tq + Tk) fused (reference: O(Tq·Tk))")

    def reference(self, x: AttentionInputs):
        return dense_softmax_attention(x), None  # softmax(scale q k^T + mask) v, written out

    @fast_path("sdpa", priority=10)
    def sdpa(self, x: AttentionInputs):
        return masked_sdpa(x), None

    def flops(self, shape: Shape, pattern: Pattern) -> float:
        per_head = 2.0 * shape.tq * shape.tk * (shape.dk + shape.dv)
        return shape.batch * shape.heads * per_head * causal_factor(shape, pattern)
