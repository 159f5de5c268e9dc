"""Retention — Retentive Network: A Successor to Transformer for Large Language Models (Sun et al., 2023,
arXiv:2307.08621); the bidirectional and 2-D Manhattan decays of RMT: Retentive Networks Meet Vision
Transformers (Fan et al., 2023, arXiv:2309.11523).

    parallel:   Retention(X) = (s Q K^T ⊙ D) V,   D_nm = gamma^(n-m) if n >= m else 0      (causal_self)
                                                  D_nm = gamma^|n-m|                        (noncausal_self, RMT)
                                                  D_nm = gamma^(|x_n-x_m| + |y_n-y_m|)      (noncausal_self on a grid)
    recurrent:  S_n = gamma S_(n-1) + k_n^T v_n,   o_n = s q_n S_n
    chunkwise:  R_i = K_[i]^T (V_[i] ⊙ zeta) + gamma^C R_(i-1),  o_[i] = (s Q K^T ⊙ D) V + (s Q R_(i-1)) ⊙ xi

with one decay per head, gamma_h = 1 - 2^(-5-h) for h = 0..H-1 (multi-scale retention), and s the
score scale of the call (RetNet: d^-1/2). There is no normaliser: RetNet follows retention with a
GroupNorm per head, and its three numerical normalisations (D's rows by sqrt(sum D), the scores by
max(|sum|, 1)) multiply each token's head output by a positive scalar that this GroupNorm cancels, so
they belong to the layer, as do the xPos rotation of q, k (a layer's ``rope``), the swish gate and
the GroupNorm itself.

Grid form (RMT's Manhattan self-attention): with ``spatial_shape=(h, w)`` (or ``(d, h, w)``: the
Manhattan distance over three axes) noncausal_self decays by the L1 distance between the tokens' grid
positions (row-major), with retention's own gammas; a 1-D or absent ``spatial_shape`` is the 1-D form.
The grid switches it on, no option does: the 1-D form over the raster order of an image is a different,
well-defined computation, and the grid says which one is meant. Choices where RMT differs or is silent:

- RMT multiplies its decay onto softmax scores, ``Softmax(Q K^T) ⊙ D^2d``; here the decay stays on
  retention's linear scores (no softmax, no normaliser). The issue asks for the decay as an option of
  this mechanism, and the linear form admits an O(T·Dk·Dv) path: the decay is separable,
  gamma^|dx| · gamma^|dy|, so S(p) = sum_m D(p, m) k_m v_m^T is a two-sided exponential filter of the
  outer products along each axis in turn (the ``bidirectional`` path, ``ops/manhattan.py``), and
  o_n = s q_n S(p_n). RMT's decomposed form (attention along rows, then columns) is RMT's
  approximation for speed; this form is its exact Manhattan decay.
- The decay has no window: every key is seen, with weight gamma^(L1 distance). On any grid (no
  divisibility asked) a border key simply has fewer neighbours; nothing wraps around, so raster
  neighbours (y, w-1) and (y+1, 0) are w apart, not 1.
- RMT's gammas (1 - 2^(-a - b·h/H), a per-stage range) are a layer's choice: pass them as ``gammas``.
- Causal_self on a grid is refused (RMT is bidirectional); the state and decoding stay 1-D.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..inputs import AttentionInputs
from ..mechanism import Complexity, Paper, Shape, fast_path, register_mechanism
from ..ops.chunked import DEFAULT_CHUNK
from ..ops.decay import check_per_head, per_head
from ..ops.gqa import repeat_kv
from ..ops.manhattan import manhattan_decayed_attention
from ..ops.masking import visibility
from ..ops.spatial import grid_coords
from ..options import check_int
from ..patterns import Pattern
from ._decay_base import HeadwiseDecay
from ._kernel_base import KernelAttention


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
    complexity = Complexity(time="O(T·C·D + T·D²)", memory="O(T·D); on a grid O(T·D²) (state O(D²) per query head)")
    grid_dims = (2, 3)  # RMT's Manhattan decay over two or three axes
    grid_patterns = frozenset({Pattern.NONCAUSAL_SELF})
    Options = RetentionOptions
    example_options = ({}, {"gammas": (0.6,), "chunk_size": 16})

    def head_log_decays(self, heads: int) -> torch.Tensor:
        gammas = self.options.gammas
        return torch.log(retnet_gammas(heads) if gammas is None else per_head(self.name, "gammas", gammas, heads))

    def features(self, x: AttentionInputs, role: str) -> torch.Tensor:
        """RetNet scales q.k by d^-1/2: the call's scale goes on q, k passes as it is."""
        dtype = self.compute_dtype(x)
        return x.q.to(dtype) * x.scale if role == "q" else x.k.to(dtype)

    # ---- the grid form: RMT's Manhattan decay --------------------------------------------------------

    def reference(self, x: AttentionInputs):
        if not on_grid(x):
            return super().reference(x)
        q, k = self.features(x, "q"), self.features(x, "k")  # s q, k: [B, T, H, Dk]
        scores = torch.einsum("bqhf,bkhf->bhqk", q, repeat_kv(k, x.groups))  # s Q K^T: [B, H, T, T]
        seen = visibility(x)  # key padding
        if seen is not None:
            scores = scores * seen
        coords = grid_coords(x.spatial_shape, device=q.device)  # [T, rank]
        manhattan = (coords[:, None, :] - coords[None, :, :]).abs().sum(-1).to(q.dtype)  # [T, T]
        decay = torch.exp(self.log_decay(x)[:, None, None] * manhattan)  # D = gamma^(|dx| + |dy|): [H, T, T]
        out = torch.einsum("bhqk,bkhe->bqhe", scores * decay, repeat_kv(x.v.to(q.dtype), x.groups))
        return out.to(x.q.dtype), None

    @fast_path("bidirectional", priority=10)
    def bidirectional(self, x: AttentionInputs):
        """A forward and a backward decayed scan along the sequence (KernelAttention's chunked path), or on a
        grid along each axis in turn (the separable filter of ``ops/manhattan.py``)."""
        if not on_grid(x):
            return KernelAttention.bidirectional(self, x)
        q, k = self.features(x, "q"), self._phi_k(x)
        out = manhattan_decayed_attention(q, k, x.v.to(q.dtype), x.spatial_shape, self.log_decay(x))
        return out.to(x.q.dtype).contiguous(), None

    @bidirectional.unsupported
    def bidirectional(self, x: AttentionInputs) -> list[str]:
        return KernelAttention.bidirectional.not_supported_reasons(self, x)

    def flops(self, shape: Shape, pattern: Pattern) -> float:
        """On a grid: the outer products k v^T (2 per element of the field), per axis longer than 1 a forward
        and a backward scan (2 each) and their sum (1), and the read-out q . S (2)."""
        if pattern is not Pattern.NONCAUSAL_SELF or shape.grid is None or len(shape.grid) < 2:
            return super().flops(shape, pattern)
        axes = sum(size > 1 for size in shape.grid)
        return float(shape.batch * shape.heads * shape.tq * shape.dk * shape.dv * (2 + 5 * axes + 2))


def on_grid(x: AttentionInputs) -> bool:
    """Whether the call runs the grid form (a 2-D or 3-D ``spatial_shape``; a 1-D one is the sequence)."""
    return x.spatial_shape is not None and len(x.spatial_shape) > 1
