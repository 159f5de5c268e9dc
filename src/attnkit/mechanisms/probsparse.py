"""ProbSparse self-attention — Informer: Beyond Efficient Transformer for Long Sequence Time-Series Forecasting
(Zhou et al., 2021, arXiv:2012.07436).

A query's sparsity measurement, estimated on U sampled keys, ranks the queries; the top u "active" queries get
full softmax attention and the others ("lazy") the mean of v:

    M(q_i, K) = max_{j in S} s_ij - mean_{j in S} s_ij,   s_ij = scale · q_i.k_j,   |S| = U = c·ceil(ln n_k)
    out_i = softmax(s_i) V  if i is among the u = c·ceil(ln n_q) largest M,  else  mean_j v_j

Choices where the paper is vague (or its code differs):
- n_k, n_q count real tokens only (in a self pattern a padded position is neither a key nor a candidate query);
  U and u are at least 1 and at most n (0 when a row has no real key: every output is then 0).
- S is one draw of U key ranks shared by all queries (the paper's code draws per query), sampled with
  replacement: ranks among the row's real keys, drawn from the module seed and n_k only, so the draw is
  reproducible per (seed, n_k) and padding or the number of queries never changes it.
- The mean in M is over the U samples (the paper's code divides the sum by the whole key length).
- Ties in M: the lower query index wins (a stable sort); heads choose their queries independently.
- The choice of queries is not differentiated (a hard selection), as in the paper.

The ``gather`` path computes M in chunks of queries (O(T·U)), sorts M (O(T log T)) and runs SDPA for the
u active queries only (O(u·T)): O(T log T) time, O(T) memory. Reference and path share ``active_queries``.
Causal patterns raise: the lazy queries' mean of v and the ranking both read every key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..inputs import AttentionInputs
from ..mechanism import Complexity, Mechanism, Paper, Shape, fast_path, register_mechanism
from ..ops.gqa import repeat_kv
from ..ops.masking import masked_softmax, visibility
from ..ops.pooled import block_means, real_mask
from ..ops.reference import compute_dtype, upcast_qkv
from ..ops.sdpa import sdpa
from ..options import MAX_SEED, check_int
from ..patterns import Pattern
from ._seeded import SeededDraws

# Sampled scores (batch x heads x queries x samples) one chunk of queries may hold while M is measured.
CHUNK_SCORES = 1 << 18


@dataclass(frozen=True)
class ProbSparseOptions:
    factor: int = 5  # c: U = c·ceil(ln n_k) sampled keys, u = c·ceil(ln n_q) active queries
    seed: int | None = None  # the key samples come from this seed; None: a seed drawn at create

    def __post_init__(self):
        check_int("probsparse", "factor", self.factor)
        if self.seed is not None:
            check_int("probsparse", "seed", self.seed, minimum=0, maximum=MAX_SEED)


def log_count(factor: int, n: int) -> int:
    """``min(n, max(1, factor·ceil(ln n)))`` (0 when n = 0): the paper's U and u for n tokens."""
    return 0 if n == 0 else min(n, max(1, factor * math.ceil(math.log(n))))


@dataclass(frozen=True)
class Active:
    """The queries each head attends with: ``index [B, H, u_max]`` (best first) and ``used [B, u_max]``
    (slot < the row's u)."""

    index: torch.Tensor
    used: torch.Tensor

    def mask(self, tq: int) -> torch.Tensor:
        """``[B, Tq, H]`` True for active queries."""
        b, h, _ = self.index.shape
        flags = torch.zeros(b, h, tq, dtype=torch.bool, device=self.index.device)
        flags.scatter_(2, self.index, self.used[:, None, :].expand_as(self.index))
        return flags.transpose(1, 2)


@register_mechanism("probsparse")
class ProbSparse(SeededDraws, Mechanism):
    family = "routed sparse"
    paper = Paper("Informer: Beyond Efficient Transformer for Long Sequence Time-Series Forecasting", 2021,
                  "2012.07436")  # fmt: skip
    patterns = frozenset({Pattern.NONCAUSAL_SELF, Pattern.NONCAUSAL_CROSS})
    exact = False
    complexity = Complexity(time="O(T·log T·D)", memory="O(T)")
    Options = ProbSparseOptions
    example_options = ({"factor": 1, "seed": 0}, {"factor": 2})
    fidelity_knob = ("factor", (1, 3, 5, 10))

    # ---- the shared selection ------------------------------------------------------------------------

    def key_sample(self, n: int, device=None) -> torch.Tensor:
        """The U sampled ranks (among a row's n real keys), a pure function of (seed, n)."""
        make = lambda gen: torch.randint(max(n, 1), (log_count(self.options.factor, n),), generator=gen)  # noqa: E731
        return self.drawn(("keys", n), make).to(device)

    def _sampled_keys(self, x: AttentionInputs, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``keys [B, U_max, Hkv, Dk]`` sampled per row and ``ok [B, U_max]`` (slot < the row's U)."""
        counts = real.sum(dim=1).tolist()
        samples = [self.key_sample(n, x.k.device) for n in counts]
        width = max(1, max(len(s) for s in samples))
        ranks = torch.zeros(x.batch, width, dtype=torch.long, device=x.k.device)
        ok = torch.zeros(x.batch, width, dtype=torch.bool, device=x.k.device)
        for b, s in enumerate(samples):
            ranks[b, : len(s)], ok[b, : len(s)] = s, True
        if x.key_padding_mask is not None:  # rank r -> position of the row's r-th real key
            positions = torch.sort((~real).to(torch.uint8), dim=1, stable=True).indices  # [B, Tk]
            ranks = positions.gather(1, ranks)
        keys = x.k.gather(1, ranks[:, :, None, None].expand(-1, -1, *x.k.shape[2:]))
        return keys, ok

    @torch.no_grad()
    def active_queries(self, x: AttentionInputs) -> Active:
        """The u queries of largest M per head (reference and fast path both call this)."""
        cdt = compute_dtype(x.q.dtype)
        real = real_mask(x.key_padding_mask, x.batch, x.tk, x.k.device)  # [B, Tk]
        keys, ok = self._sampled_keys(x, real)
        keys = repeat_kv(keys, x.groups).to(cdt).transpose(1, 2)  # [B, H, U, Dk]
        q = x.q.to(cdt).transpose(1, 2)  # [B, H, Tq, Dk]
        ok4 = ok[:, None, None, :]  # [B, 1, 1, U]
        n_samples = ok.sum(dim=1).clamp(min=1).to(cdt)[:, None, None]  # [B, 1, 1]
        step = max(1, CHUNK_SCORES // (x.batch * x.heads * keys.shape[2]))
        parts = []
        for start in range(0, x.tq, step):
            s = q[:, :, start : start + step] @ keys.transpose(-1, -2) * x.scale  # [B, H, chunk, U]
            top = s.masked_fill(~ok4, float("-inf")).amax(dim=-1)
            mean = torch.where(ok4, s, torch.zeros((), dtype=cdt, device=s.device)).sum(dim=-1) / n_samples
            parts.append(top - mean)
        m = torch.cat(parts, dim=-1)  # [B, H, Tq]
        candidates = x.key_padding_mask if x.pattern.is_self and x.key_padding_mask is not None else None
        n_q = [x.tq] * x.batch if candidates is None else candidates.sum(dim=1).tolist()
        if candidates is not None:
            m = m.masked_fill(~candidates[:, None, :], float("-inf"))  # padded positions are never chosen
        u = [log_count(self.options.factor, nq) if nk else 0 for nq, nk in zip(n_q, real.sum(1).tolist(), strict=True)]
        width = max(1, max(u))
        index = torch.sort(m, dim=-1, descending=True, stable=True).indices[..., :width]  # ties: lower index first
        used = torch.arange(width, device=m.device) < torch.tensor(u, device=m.device)[:, None]  # [B, u_max]
        return Active(index, used)

    def _lazy(self, x: AttentionInputs, v: torch.Tensor) -> torch.Tensor:
        """The lazy queries' output, the mean of v over real keys: ``[B, 1, H, Dv]`` (0 with no real key)."""
        mean, _ = block_means(v, x.key_padding_mask, max(1, x.tk))  # [B, 1, Hkv, Dv]
        return repeat_kv(mean, x.groups)

    # ---- paths ------------------------------------------------------------------------------------------

    def reference(self, x: AttentionInputs):
        q, k, v = upcast_qkv(x)  # [B, Tq, H, Dk], [B, Tk, H, D*]
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * x.scale  # [B, H, Tq, Tk]
        full = torch.einsum("bhqk,bkhd->bqhd", masked_softmax(scores, visibility(x)), v)  # [B, Tq, H, Dv]
        real = real_mask(x.key_padding_mask, x.batch, x.tk, q.device)[:, :, None, None]  # [B, Tk, 1, 1]
        mean_v = torch.where(real, v, 0.0).sum(dim=1, keepdim=True) / real.sum(dim=1, keepdim=True).clamp(min=1)
        active = self.active_queries(x).mask(x.tq)[..., None]  # [B, Tq, H, 1]
        return torch.where(active, full, mean_v).to(x.q.dtype), None

    @fast_path("gather", priority=10)
    def gather(self, x: AttentionInputs):
        cdt = compute_dtype(x.q.dtype)
        act = self.active_queries(x)
        slots = act.index.transpose(1, 2)  # [B, u, H]
        q = x.q.gather(1, slots[..., None].expand(-1, -1, -1, x.q.shape[-1])).to(cdt)  # [B, u, H, Dk]
        k, v = x.k.to(cdt), x.v.to(cdt)
        mask = None
        if x.key_padding_mask is not None:  # a row without a real key attends to its (zeroed) padding: unused
            kpm = x.key_padding_mask
            mask = (kpm | ~kpm.any(dim=1, keepdim=True))[:, None, None, :]  # [B, 1, 1, Tk]
        full = sdpa(q, k, v, scale=x.scale, mask=mask)  # [B, u, H, Dv]
        lazy = self._lazy(x, v)  # [B, 1, H, Dv]
        full = torch.where(act.used[:, :, None, None], full, lazy)  # slots past a row's u stay lazy
        out = lazy.expand(-1, x.tq, -1, -1).scatter(1, slots[..., None].expand_as(full), full)  # [B, Tq, H, Dv]
        return out.to(x.q.dtype), None

    def flops(self, shape: Shape, pattern: Pattern) -> float:
        c = self.options.factor
        n_samples, n_active = log_count(c, shape.tk), log_count(c, shape.tq)
        measure = 2.0 * shape.tq * n_samples * shape.dk
        attend = 2.0 * n_active * shape.tk * (shape.dk + shape.dv)
        return shape.batch * shape.heads * (measure + attend + shape.tk * shape.dv)
