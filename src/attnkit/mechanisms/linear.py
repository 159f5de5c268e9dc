"""Linear attention — Transformers are RNNs: Fast Autoregressive Transformers with Linear Attention
(Katharopoulos et al., 2020, arXiv:2006.16236).

    out_i = phi(q_i)^T S_i / (phi(q_i)^T z_i + eps),   S_i = sum_j phi(k_j) v_j^T,   z_i = sum_j phi(k_j)

with the sums over the keys query i sees (j <= i in causal_self). No softmax scale. The ``associative``
path computes phi(Q) (phi(K)^T V) for the noncausal patterns in O(T D^2); the ``chunk`` path is the
Lightning Attention-2 tiling for causal_self with O(T) memory and a constant-size recurrent state;
``recurrent`` is the token-by-token RNN form (decoding). The machinery is ``KernelAttention``'s.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..inputs import AttentionInputs
from ..mechanism import Complexity, Paper, register_mechanism
from ..ops.chunked import DEFAULT_CHUNK
from ..ops.feature_maps import FEATURE_MAPS
from ..options import check_choice, check_float, check_int
from ..patterns import ALL_PATTERNS
from ._kernel_base import KernelAttention


@dataclass(frozen=True)
class LinearOptions:
    feature_map: str = "elu1"  # phi: elu1 (elu(x) + 1), relu or identity
    eps: float = 1e-6  # added to the normaliser phi(q).z so it never divides by zero
    chunk_size: int = DEFAULT_CHUNK  # tokens per chunk of the causal chunk path (speed only)

    def __post_init__(self):
        check_choice("linear", "feature_map", self.feature_map, tuple(FEATURE_MAPS))
        check_float("linear", "eps", self.eps, positive=True)
        check_int("linear", "chunk_size", self.chunk_size)


@register_mechanism("linear")
class Linear(KernelAttention):
    family = "kernel"
    paper = Paper("Transformers are RNNs: Fast Autoregressive Transformers with Linear Attention", 2020, "2006.16236")
    patterns = ALL_PATTERNS
    exact = False
    heads_independent = True
    uses_scale = False
    complexity = Complexity(time="O(T·D²)", memory="O(T·D) (state O(D²))")
    Options = LinearOptions
    example_options = ({}, {"feature_map": "relu", "chunk_size": 16})
    fidelity_knob = ("feature_map", ("elu1", "relu"))

    def features(self, x: AttentionInputs, role: str) -> torch.Tensor:
        t = x.q if role == "q" else x.k
        return FEATURE_MAPS[self.options.feature_map](t.to(self.compute_dtype(x)))
