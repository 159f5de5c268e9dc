"""cosFormer — cosFormer: Rethinking Softmax in Attention (Qin et al., 2022, arXiv:2202.08791).

ReLU features with a cos re-weighting that favours nearby tokens:

    s(q_i, k_j) = relu(q_i) . relu(k_j) * cos(pi/2 * (i - j) / M)
                = [relu(q_i) cos(a i), relu(q_i) sin(a i)] . [relu(k_j) cos(a j), relu(k_j) sin(a j)],  a = pi / 2M
    out_i = sum_j s(q_i, k_j) v_j / (sum_j s(q_i, k_j) + eps)

(the paper's Ptolemy decomposition: cos(a(i - j)) = cos(ai) cos(aj) + sin(ai) sin(aj)), so the features
have 2 D entries and the attention is linear in T. No softmax scale. ``M`` is the option ``max_len``,
never the call's length, so no output depends on how long the call is (the paper sets M to the sequence
length, which a causal model cannot know). The paper needs |i - j| <= M for the weight to stay
non-negative: positions must lie in [0, M), and a call that would reach position M raises
``InvalidOption`` before any compute.

Positions: self patterns number tokens by their index in the sequence, continuing across chunked
calls (padding at either end shifts queries and keys alike, which the weight, a function of i - j,
does not see; padded tokens count towards max_len). Cross patterns number the queries by their index
in the call (so causal_cross holds: query i is at i whether or not later queries are passed; when
decoding cross attention one query at a time, pass all queries so far) and the keys by their rank
among the real keys (so a context padded on either side gives the same outputs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import InvalidOption
from ..inputs import AttentionInputs
from ..mechanism import Complexity, Paper, register_mechanism
from ..ops.chunked import DEFAULT_CHUNK
from ..options import check_float, check_int
from ..patterns import ALL_PATTERNS
from ._kernel_base import KernelAttention


@dataclass(frozen=True)
class CosformerOptions:
    max_len: int = 8192  # M: positions must lie in [0, M); the weight cos(pi/2 (i-j)/M) falls to 0 at |i-j| = M
    eps: float = 1e-6  # added to the normaliser so a query that sees no key gets 0, not NaN
    chunk_size: int = DEFAULT_CHUNK  # tokens per chunk of the causal chunk path (speed only)

    def __post_init__(self):
        check_int("cosformer", "max_len", self.max_len)
        check_float("cosformer", "eps", self.eps, positive=True)
        check_int("cosformer", "chunk_size", self.chunk_size)


@register_mechanism("cosformer")
class Cosformer(KernelAttention):
    family = "kernel"
    paper = Paper("cosFormer: Rethinking Softmax in Attention", 2022, "2202.08791")
    patterns = ALL_PATTERNS
    exact = False
    heads_independent = True
    uses_scale = False
    complexity = Complexity(time="O(T·D²)", memory="O(T·D) (state O(D²))")
    Options = CosformerOptions
    example_options = ({}, {"max_len": 256, "chunk_size": 16})
    fidelity_knob = ("max_len", (4096, 16384))  # >= the fidelity sweep's longest T (4096)

    def check_call(self, x: AttentionInputs) -> None:
        super().check_call(x)
        start = x.state.offset if (x.state is not None and x.pattern.is_self) else 0
        last = start + max(x.tq, x.tk) - 1  # the last position this call gives a token
        if last >= self.options.max_len:
            raise InvalidOption(
                f"cosformer max_len={self.options.max_len} covers positions 0..{self.options.max_len - 1}, but this "
                f"call reaches position {last} ({start} tokens before it, Tq={x.tq}, Tk={x.tk}); "
                "create it with a larger max_len"
            )

    def token_positions(self, x: AttentionInputs, role: str) -> torch.Tensor:
        """Positions ``[T]`` or ``[B, T]`` (cross-pattern keys: rank among the real keys)."""
        if role == "k" and not x.pattern.is_self and x.key_padding_mask is not None:
            return (x.key_padding_mask.cumsum(dim=1) - 1).clamp(min=0)  # [B, Tk]
        return self.positions(x, role)  # [T]

    def features(self, x: AttentionInputs, role: str) -> torch.Tensor:
        cdt = self.compute_dtype(x)
        t = F.relu((x.q if role == "q" else x.k).to(cdt)).transpose(1, 2)  # [B, H, T, D]
        angle = self.token_positions(x, role).to(cdt) * (math.pi / (2 * self.options.max_len))  # [T] or [B, T]
        if angle.dim() == 1:
            angle = angle[None]
        cos, sin = angle.cos()[:, None, :, None], angle.sin()[:, None, :, None]  # [B or 1, 1, T, 1]
        # [B, T, H, 2D], a view of [B, H, T, 2D]: heads first, so the chunked scan needs no copy
        return torch.cat([t * cos, t * sin], dim=-1).transpose(1, 2)

    def state_dk(self, dk: int) -> int:
        return 2 * dk
