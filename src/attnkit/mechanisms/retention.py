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

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import InvalidOption, ShapeError
from ..inputs import AttentionInputs
from ..mechanism import Complexity, Paper, Shape, register_mechanism
from ..ops.chunked import DEFAULT_CHUNK
from ..ops.gqa import repeat_kv
from ..options import check_int
from ..patterns import Pattern
from ..state import RecurrentState, State
from ._kernel_base import KernelAttention


def check_per_head(mechanism: str, name: str, value: Any, *, low: float, high: float, open_low: bool) -> None:
    """A per-head tuple option: None, or a non-empty sequence of numbers in (low, high] / [low, high] (one
    per query head, or one for every head)."""
    if value is None:
        return
    ok = isinstance(value, tuple | list) and len(value) > 0
    for g in value if ok else ():
        good = isinstance(g, int | float) and not isinstance(g, bool) and math.isfinite(g)
        ok = ok and good and (g > low if open_low else g >= low) and g <= high
    if not ok:
        side = "(" if open_low else "["
        raise InvalidOption(
            f"{mechanism} option {name}={value!r} is not valid; expected numbers in {side}{low}, {high}], one per "
            "query head or one for all heads, or None"
        )


class HeadwiseDecay(KernelAttention):
    """Decayed linear attention with one decay per query head and no normaliser (not registered itself).

    The base of ``retention`` and ``lightning``. Under GQA every query head keeps its own decay, so it
    keeps its own state: k, v are repeated to the query heads before any path runs (as fla's
    MultiScaleRetention does), and the recurrent state is ``S [B, Hq, F, Dv]``. A decay per kv head
    could not give each query head of a group its own scale.
    """

    normalised = False
    decays = True
    patterns = frozenset({Pattern.CAUSAL_SELF, Pattern.NONCAUSAL_SELF})

    def head_log_decays(self, heads: int) -> torch.Tensor:
        """``log gamma_h`` (<= 0) of query heads ``h = 0..heads-1``, float64 ``[heads]``."""
        raise NotImplementedError

    def log_decay(self, x: AttentionInputs) -> torch.Tensor:
        # after join_cache, x has one kv head per query head
        return self.head_log_decays(x.heads).to(device=x.q.device, dtype=self.compute_dtype(x))

    # ---- GQA and state: one state per query head ----------------------------------------------------

    def join_cache(self, x: AttentionInputs) -> tuple[AttentionInputs, State | None]:
        """Repeat k, v to the query heads (GQA) so that every query head has its own decay and state."""
        if x.groups > 1:
            x = x.replace(k=repeat_kv(x.k, x.groups), v=repeat_kv(x.v, x.groups))
        return x, None

    def check_state(self, state: State, k: torch.Tensor, v: torch.Tensor) -> None:
        assert isinstance(state, RecurrentState)
        b, _, hkv, dk = k.shape
        got = tuple(state.S.shape)
        if got[0] != b or got[2:] != (self.state_dk(dk), v.shape[-1]) or got[1] % hkv:
            raise ShapeError(
                f"state does not fit the inputs: it holds (batch, heads, dk, dv) = {got}, the call has batch {b}, "
                f"{hkv} kv heads, dk {dk}, dv {v.shape[-1]} ({self.name} keeps one state per query head)"
            )
        if state.S.device != k.device:
            raise ShapeError(f"state is on {state.S.device} but k is on {k.device}")

    def check_call(self, x: AttentionInputs) -> None:
        super().check_call(x)
        if x.state is not None and x.state.S.shape[1] != x.heads:
            raise ShapeError(
                f"state does not fit the inputs: it holds {x.state.S.shape[1]} heads, q has {x.heads} "
                f"({self.name} keeps one state per query head)"
            )
        self.head_log_decays(x.heads)  # an option sized for other head counts raises here

    def state_bytes(self, shape: Shape, dtype: torch.dtype = torch.float32) -> int:
        f = self.state_dk(shape.dk)
        return RecurrentState.zeros(shape.batch, shape.heads, f, shape.dv, normalised=False, device="meta").nbytes

    def flops(self, shape: Shape, pattern: Pattern) -> float:
        scan = super().flops(shape._replace(kv_heads=shape.heads), Pattern.CAUSAL_SELF)
        return scan if pattern is Pattern.CAUSAL_SELF else 2 * scan  # noncausal: a forward and a backward scan


@dataclass(frozen=True)
class RetentionOptions:
    gammas: tuple[float, ...] | None = None  # decay per query head (or one for all), in (0, 1]; None: 1 - 2^(-5-h)
    chunk_size: int = DEFAULT_CHUNK  # tokens per chunk of the chunkwise form (speed only)

    def __post_init__(self):
        check_per_head("retention", "gammas", self.gammas, low=0.0, high=1.0, open_low=True)
        if self.gammas is not None:
            object.__setattr__(self, "gammas", tuple(float(g) for g in self.gammas))
        check_int("retention", "chunk_size", self.chunk_size)


def per_head(mechanism: str, name: str, values: tuple[float, ...], heads: int) -> torch.Tensor:
    """A per-head option's values for ``heads`` query heads (a single value serves every head), float64."""
    if len(values) not in (1, heads):
        raise InvalidOption(f"{mechanism} option {name} has {len(values)} values but q has {heads} heads")
    return torch.tensor(values, dtype=torch.float64).expand(heads)


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
