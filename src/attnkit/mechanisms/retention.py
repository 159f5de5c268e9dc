"""Retention — Retentive Network: A Successor to Transformer for Large Language Models (Sun et al., 2023,
arXiv:2307.08621); the bidirectional decay of RMT: Retentive Networks Meet Vision Transformers (Fan et al.,
2023, arXiv:2309.11523).

    parallel:   Retention(X) = (s Q K^T ⊙ D) V,   D_nm = gamma^(n-m) if n >= m else 0      (causal_self)
                                                  D_nm = gamma^|n-m|                        (noncausal_self, RMT)
    recurrent:  S_n = gamma S_(n-1) + k_n^T v_n,   o_n = s q_n S_n
    chunkwise:  R_i = K_[i]^T (V_[i] ⊙ zeta) + gamma^C R_(i-1),  o_[i] = (s Q K^T ⊙ D) V + (s Q R_(i-1)) ⊙ xi

with one decay per head, gamma_h = 1 - 2^(-5-h) for h = 0..H-1 (multi-scale retention), and s the
score scale of the call (RetNet: d^-1/2). There is no normaliser: RetNet follows retention with a
GroupNorm per head, and its three numerical normalisations (D's rows by sqrt(sum D), the scores by
max(|sum|, 1)) multiply each token's head output by a positive scalar that this GroupNorm cancels, so
they belong to the layer, as do the xPos rotation of q, k (a layer's ``rope``), the swish gate and
the GroupNorm itself. RMT multiplies its 2-D Manhattan decay onto softmax scores; here the 1-D
bidirectional decay gamma^|n-m| is applied to retention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..inputs import AttentionInputs
from ..mechanism import Complexity, Paper, register_mechanism
from ..ops.chunked import DEFAULT_CHUNK
from ..ops.decay import check_per_head, per_head
from ..options import check_int
from ._decay_base import HeadwiseDecay


@dataclass(frozen=True)
class RetentionOptions:
    gammas: tuple[float, ...] | None = None  # decay per query head (or one for all), in (0, 1]; None: 1 - 2^(-5-h)
    chunk_size: int = DEFAULT_CHUNK  # tokens per chunk of the chunkwise form (speed only)

    def __post_init__(self):
        check_per_head("retention", "gammas", self.gammas, low=0.0, high=1.0, open_low=True)
        if self.gammas is not None:
            object.__setattr__(self, "gammas", tuple(float(g) for g in self.gammas))
        check_int("retention", "chunk_size", self.chunk_size)


def retnet_gammas(heads: int) -> torch.Tensor:
    """RetNet's multi-scale decays ``gamma_h = 1 - 2^(-5-h)``, float64 ``[heads]``."""
    return 1 - 2.0 ** (-5 - torch.arange(heads, dtype=torch.float64))


@register_mechanism("retention")
class Retention(HeadwiseDecay):
    family = "decay"
    paper = Paper("Retentive Network: A Successor to Transformer for Large Language Models", 2023, "2307.08621")
    exact = False
    uses_scale = True
    complexity = Complexity(time="O(T·C·D + T·D²)", memory="O(T·D) (state O(D²) per query head)")
    Options = RetentionOptions
    example_options = ({}, {"gammas": (0.6,), "chunk_size": 16})

    def head_log_decays(self, heads: int) -> torch.Tensor:
        gammas = self.options.gammas
        return torch.log(retnet_gammas(heads) if gammas is None else per_head(self.name, "gammas", gammas, heads))

    def features(self, x: AttentionInputs, role: str) -> torch.Tensor:
        """RetNet scales q.k by d^-1/2: the call's scale goes on q, k passes as it is."""
        dtype = self.compute_dtype(x)
        return x.q.to(dtype) * x.scale if role == "q" else x.k.to(dtype)
