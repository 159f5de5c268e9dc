"""Performer (FAVOR+) — Rethinking Attention with Performers (Choromanski et al., 2021, arXiv:2009.14794).

Positive orthogonal random features estimate the softmax kernel:

    phi(x) = exp(W x - |x|^2 / 2) / sqrt(m),   x = q * d^(-1/4)  (here q * sqrt(scale)),
    E[phi(x_q) . phi(x_k)] = exp(q . k / sqrt(d)),   out_i = sum_j phi(q_i).phi(k_j) v_j / sum_j phi(q_i).phi(k_j)

``W`` is ``[m, d]``: Gaussian rows orthogonalised per ``d x d`` block (QR), each row then rescaled to the
norm of an independent Gaussian vector (chi-distributed with d degrees of freedom).

The features are drawn once: ``W`` is a pure function of ``(seed, d, m)``, so one mechanism gives the
same features on every call, truncated calls and chunked decoding agree, and two mechanisms built with
the same ``seed`` are identical. ``seed=None`` draws the seed at create from torch's global generator
(reproducible under ``torch.manual_seed``, different per layer); the seed is saved in ``state_dict``.
One ``W`` is shared by all heads (as in the paper's code and performer-pytorch): a query head and the
key head it reads must use the same features, and sharing keeps GQA equal to repeating k, v.

Numerical stability. Queries: ``exp(W x - max_f (W x)_f)``, a per-query factor that cancels between
numerator and normaliser (so the query's ``-|x|^2/2`` is dropped too). Keys: no stabiliser. The paper's
code subtracts a max over all keys of the call, which would let a later key change an earlier causal
output and give chunked calls different scales; none is needed because the exponent is bounded
whatever the key: ``w.x - |x|^2/2 = (|w|^2 - |x - w|^2) / 2 <= |w|^2 / 2``, a constant of the draw
(at most about d/2 + 1.5 sqrt(2d) over 256 rows: e^49 for d = 64, finite in fp32; features are computed
in fp32, or fp64 for fp64 inputs). The bound is reached only by a key x = w; for d >= 128 it nears fp32's
e^88, which a key would reach only with norm |w| d^(1/4) (about 45 for d = 128, where unit-variance keys
have norm 11) pointing along the longest w. ``eps`` is added to the (query-stabilised) normaliser.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..inputs import AttentionInputs
from ..mechanism import Complexity, Paper, Shape, register_mechanism
from ..ops.chunked import DEFAULT_CHUNK
from ..ops.feature_maps import orthogonal_gaussian, positive_random_features
from ..options import MAX_SEED, check_float, check_int
from ..patterns import ALL_PATTERNS, Pattern
from ._kernel_base import KernelAttention
from ._seeded import SeededDraws


@dataclass(frozen=True)
class PerformerOptions:
    num_features: int = 256  # m, random features (the estimator's variance falls as 1/m)
    seed: int | None = None  # W is drawn from this seed; None: a seed drawn at create from torch's generator
    eps: float = 1e-6  # added to the normaliser so a query that sees no key gets 0, not NaN
    chunk_size: int = DEFAULT_CHUNK  # tokens per chunk of the causal chunk path (speed only)

    def __post_init__(self):
        check_int("performer", "num_features", self.num_features)
        if self.seed is not None:
            check_int("performer", "seed", self.seed, minimum=0, maximum=MAX_SEED)
        check_float("performer", "eps", self.eps, positive=True)
        check_int("performer", "chunk_size", self.chunk_size)


@register_mechanism("performer")
class Performer(SeededDraws, KernelAttention):
    family = "kernel"
    paper = Paper("Rethinking Attention with Performers", 2021, "2009.14794")
    patterns = ALL_PATTERNS
    exact = False
    uses_scale = True
    complexity = Complexity(time="O(T·m·D)", memory="O(T·m) (state O(m·D))")
    Options = PerformerOptions
    # fp32: exp features have gradients of size |w| ~ sqrt(d); where a query sees one key the ratio's gradient is
    # ~0 and what remains is that rounding, up to 4e-5 of the floor in the suite (linear's elu1: under 2e-5)
    tolerances = {**KernelAttention.tolerances, torch.float32: 5e-5}
    example_options = ({"num_features": 48}, {"num_features": 16, "seed": 3, "chunk_size": 16})
    fidelity_knob = ("num_features", (64, 128, 256))

    def projection(self, dim: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        """The random features ``W [m, dim]`` (drawn in fp64 on the CPU, so every device gets the same)."""
        m = self.options.num_features
        make = lambda gen: orthogonal_gaussian(m, dim, self.draw_seed).to(device=device, dtype=dtype)  # noqa: E731
        return self.drawn((dim, torch.device(device), dtype), make)

    def features(self, x: AttentionInputs, role: str) -> torch.Tensor:
        cdt = self.compute_dtype(x)
        t = (x.q if role == "q" else x.k).to(cdt).transpose(1, 2) * math.sqrt(x.scale)  # [B, H, T, D]: x = q d^(-1/4)
        w = self.projection(t.shape[-1], t.device, cdt)  # [m, D]
        # heads first, so the chunked scan needs no copy: [B, H, T, m], returned as a [B, T, H, m] view
        return positive_random_features(t, w, per_row_max=role == "q").transpose(1, 2)

    def state_dk(self, dk: int) -> int:
        return self.options.num_features

    def flops(self, shape: Shape, pattern: Pattern) -> float:
        m = self.options.num_features
        rows = shape.tq * shape.heads + shape.tk * shape.kv_heads  # vectors mapped to features
        return super().flops(shape, pattern) + shape.batch * rows * 2.0 * m * shape.dk
