"""Lightning attention — Lightning Attention-2: A Free Lunch for Handling Unlimited Sequence Lengths in Large
Language Models (Qin et al., 2024, arXiv:2401.04658), with the decay and activation of the model it runs in,
TransNormerLLM (Qin et al., 2023, arXiv:2307.14995).

    o_t = sum_(s <= t) lambda^(t-s) (phi(q_t) . phi(k_s)) v_s,      lambda_h = exp(-s_h)
    per block i of B tokens:  O_i = [(Q_i K_i^T) ⊙ M] V_i + Lambda Q_i KV,    M_ts = lambda^(t-s) [t >= s]
                              KV <- lambda^B KV + (lambda^(B-1-s) K_i)^T V_i

s_h are ALiBi's slopes 2^(-8(h+1)/H) (interleaved for H not a power of two), scaled by TransNormerLLM's
layer factor 1 - l/(L-1) + 1e-5; phi is TransNormerLLM's swish (SiLU) on q and k. No score scale and no
normaliser: the model normalises the output with SRMSNorm after the mechanism. noncausal_self uses the
symmetric decay lambda^|t-s|. The intra-block masked matmul plus inter-block state is the base's chunk
path, with ``block_size`` tokens per block; decoding is the recurrence KV <- lambda KV + k^T v.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import InvalidOption
from ..inputs import AttentionInputs
from ..mechanism import Complexity, Paper, register_mechanism
from ..ops.decay import alibi_slopes, check_per_head, per_head
from ..ops.feature_maps import FEATURE_MAPS
from ..options import check_choice, check_int
from ._decay_base import HeadwiseDecay

# phi of q and k; TransNormerLLM uses swish, "identity" is the bare Lightning Attention-2 kernel
ACTIVATIONS = {"silu": F.silu, **FEATURE_MAPS}
BLOCK = 64  # the block size of Lightning Attention-2's Triton forward kernel; also the fastest chunk on CPU


@dataclass(frozen=True)
class LightningOptions:
    activation: str = "silu"  # phi on q and k: silu (TransNormerLLM's swish), elu1, relu or identity
    slopes: tuple[float, ...] | None = None  # s_h >= 0 per query head (or one for all), lambda = exp(-s); None: ALiBi
    layer: int = 0  # this layer's index l: the slopes are scaled by 1 - l/(L-1) + 1e-5 (TransNormerLLM)
    layers: int = 1  # the model's number of layers L (with L = 1 the factor is 1 + 1e-5)
    block_size: int = BLOCK  # tokens per block of the intra/inter-block tiling (speed only)

    def __post_init__(self):
        check_choice("lightning", "activation", self.activation, tuple(ACTIVATIONS))
        check_per_head("lightning", "slopes", self.slopes, low=0.0, high=math.inf, open_low=False)
        if self.slopes is not None:
            object.__setattr__(self, "slopes", tuple(float(s) for s in self.slopes))
        check_int("lightning", "layers", self.layers)
        check_int("lightning", "layer", self.layer, minimum=0)
        if self.layer >= self.layers:
            raise InvalidOption(f"lightning option layer={self.layer} is not valid; expected 0 <= layer < layers")
        check_int("lightning", "block_size", self.block_size)


@register_mechanism("lightning")
class Lightning(HeadwiseDecay):
    family = "decay"
    paper = Paper(
        "Lightning Attention-2: A Free Lunch for Handling Unlimited Sequence Lengths in Large Language Models",
        2024,
        "2401.04658",
    )
    exact = False
    uses_scale = False
    complexity = Complexity(time="O(T·B·D + T·D²)", memory="O(T·D) (state O(D²) per query head)")
    Options = LightningOptions
    example_options = ({}, {"activation": "identity", "layer": 1, "layers": 3, "block_size": 16})
    fidelity_knob = ("activation", ("silu", "elu1"))

    def chunk_size(self) -> int:
        return self.options.block_size

    def head_log_decays(self, heads: int) -> torch.Tensor:
        """log lambda_h = -s_h * (1 - l/(L-1) + 1e-5)."""
        opts = self.options
        if opts.slopes is None:
            slopes = torch.tensor(alibi_slopes(heads), dtype=torch.float64)
        else:
            slopes = per_head(self.name, "slopes", opts.slopes, heads)
        layer_factor = 1 - opts.layer / (opts.layers - 1) + 1e-5 if opts.layers > 1 else 1 + 1e-5
        return -slopes * layer_factor

    def features(self, x: AttentionInputs, role: str) -> torch.Tensor:
        t = x.q if role == "q" else x.k
        return ACTIVATIONS[self.options.activation](t.to(self.compute_dtype(x)))
