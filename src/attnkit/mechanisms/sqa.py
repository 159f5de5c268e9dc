"""Sparse Query Attention — Sparse Query Attention (SQA): A Computationally Efficient Attention Mechanism
with Query Heads Reduction (Filipek, 2025, arXiv:2510.01817).

    SQA(X) = Concat(head_1..head_Hs) W_O,   head_s = softmax(scale * q_s k_g(s)^T) v_g(s)

with only Hs < H query heads (the key/value heads, Hkv <= Hs, are repeated Hs / Hkv times, as in GQA),
so the score and value products cost Hs / H of multi-head attention's.

As a mechanism on given ``q [B, T, Hq, D]`` the Hq query heads are reduced, without parameters, to
Hs = ``query_heads``: reduced head s is the **mean** of the r = Hq / Hs consecutive query heads
s*r .. s*r + r - 1 (a layer whose ``q_proj`` has the group-averaged rows computes exactly this). Those r
heads share one kv head whenever Hkv divides Hs, so no head attends to keys it did not use. Each
reduced head's output is repeated to its r heads, so the result keeps the ``[B, T, Hq, Dv]`` contract;
``W_O`` applied to it equals an SQA ``W_O`` of Hs heads with each group's weights summed.
When k has more heads than Hs (e.g. Hkv = Hq), ``pool_kv`` averages each group of Hkv / Hs kv heads
too: the paper's symmetric variant (sSQA, Hq = Hkv = Hs). The decoding cache keeps the kv heads attention
uses (``SQACache``), so under pooling it holds Hs heads and a step reads Hs / Hkv of a plain cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InvalidOption, ShapeError
from ..inputs import AttentionInputs
from ..mechanism import Complexity, Mechanism, Paper, Shape, fast_path, register_mechanism
from ..ops.flops import causal_factor
from ..ops.gqa import repeat_kv
from ..ops.masking import masked_softmax, visibility
from ..ops.reference import compute_dtype
from ..ops.sdpa import masked_sdpa
from ..options import check_int
from ..patterns import ALL_PATTERNS, Pattern
from ..state import KVCache


@dataclass(frozen=True)
class SQAOptions:
    query_heads: int | None = None  # Hs, the query heads attention runs on; None: half of q's heads, or for an
    # odd count the largest divisor below half (5 -> 1, 9 -> 3), so the default always divides them
    pool_kv: bool = True  # k with more heads than Hs: average groups of kv heads (sSQA); False: raise

    def __post_init__(self):
        if self.query_heads is not None:
            check_int("sqa", "query_heads", self.query_heads)
        if not isinstance(self.pool_kv, bool):
            raise InvalidOption(f"sqa option pool_kv={self.pool_kv!r} is not valid; expected True or False")


def _mean_groups(t: torch.Tensor, groups: int) -> torch.Tensor:
    """``[B, T, H, D] -> [B, T, H / groups, D]``: the mean of each run of ``groups`` consecutive heads."""
    b, n, h, d = t.shape
    return t.view(b, n, h // groups, groups, d).mean(dim=3)


@dataclass(frozen=True)
class SQACache(KVCache):
    """Decoding state of sqa: keys and values with the heads attention uses, ``[B, T, Hkv', D]`` (averaged
    down to Hs under ``pool_kv``, so the cache and each decoding step shrink with Hs as in an SQA layer).
    The paths join it themselves (the base class would store the raw heads)."""


@register_mechanism("sqa")
class SQA(Mechanism):
    family = "head layout"
    paper = Paper(
        "Sparse Query Attention (SQA): A Computationally Efficient Attention Mechanism with Query Heads Reduction",
        2025,
        "2510.01817",
    )
    patterns = ALL_PATTERNS
    exact = False  # softmax attention of fewer (averaged) query heads
    state_kind = SQACache
    complexity = Complexity(time="O(Tq·Tk·D·Hs/H)", memory="O(Tq + Tk) fused (reference: O(Hs·Tq·Tk))")
    Options = SQAOptions
    example_options = ({"query_heads": 2},)
    fidelity_knob = ("query_heads", (1, 2, 4))

    # ---- head layout -------------------------------------------------------------------------------

    def query_heads(self, heads: int) -> int:
        """Hs for q with ``heads`` heads."""
        if self.options.query_heads is not None:
            return self.options.query_heads
        return max(d for d in range(1, max(1, heads // 2) + 1) if heads % d == 0)

    def layout(self, heads: int, kv_heads: int) -> tuple[int, int]:
        """(Hs, kv heads attention uses) for these head counts; raises ShapeError if they do not fit."""
        hs = self.query_heads(heads)
        if heads % hs:
            raise ShapeError(
                f"sqa: query_heads={hs} must divide q's {heads} heads (each reduced head averages a group)"
            )
        if hs % kv_heads == 0:
            return hs, kv_heads
        if kv_heads % hs == 0 and self.options.pool_kv:
            return hs, hs
        hint = "" if self.options.pool_kv else " (pool_kv=True averages kv heads down to query_heads)"
        raise ShapeError(f"sqa: k has {kv_heads} heads, which must divide query_heads={hs}{hint}")

    def check_call(self, x: AttentionInputs) -> None:
        super().check_call(x)
        _, hkv = self.layout(x.heads, x.kv_heads)
        if x.state is not None and x.state.length and x.state.k.shape[2] != hkv:
            raise ShapeError(
                f"state does not fit the inputs: it holds {x.state.k.shape[2]} kv heads, these inputs use {hkv}"
            )

    def _reduce(self, x: AttentionInputs, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q reduced to Hs heads, k and v with the kv heads attention uses, in ``dtype``."""
        hs, hkv = self.layout(x.heads, x.kv_heads)
        q = _mean_groups(x.q.to(dtype), x.heads // hs)  # [B, Tq, Hs, Dk]
        k, v = x.k.to(dtype), x.v.to(dtype)
        if hkv != x.kv_heads:  # sSQA: average groups of kv heads down to Hs
            k, v = _mean_groups(k, x.kv_heads // hkv), _mean_groups(v, x.kv_heads // hkv)  # [B, Tk, Hs, D]
        return q, k, v

    # ---- the specification -------------------------------------------------------------------------

    def reference(self, x: AttentionInputs):
        compute = compute_dtype(x.q.dtype)
        q, k, v = self._reduce(x, compute)  # [B, Tq, Hs, Dk], [B, Tk, Hkv', Dk], [B, Tk, Hkv', Dv]
        x, new_state = self._join(x, k.to(x.k.dtype), v.to(x.v.dtype))  # after the cached keys, if any
        k, v = x.k.to(compute), x.v.to(compute)
        hs = q.shape[2]
        k = repeat_kv(k, hs // k.shape[2])  # [B, Tk, Hs, Dk]
        v = repeat_kv(v, hs // v.shape[2])
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * x.scale  # [B, Hs, Tq, Tk]
        probs = masked_softmax(scores, visibility(x))
        out = torch.einsum("bhqk,bkhd->bqhd", probs, v)  # [B, Tq, Hs, Dv]
        out = out.repeat_interleave(x.heads // hs, dim=2)  # [B, Tq, Hq, Dv]: each head of a group gets its output
        return out.to(x.q.dtype), new_state

    # ---- fast path ---------------------------------------------------------------------------------

    @fast_path("sdpa", priority=10)
    def sdpa(self, x: AttentionInputs):
        # averaging in fp32 keeps bf16/fp16 inputs from losing bits before the kernel sees them
        q, k, v = (t.to(x.q.dtype) for t in self._reduce(x, torch.promote_types(x.q.dtype, torch.float32)))
        x, new_state = self._join(x, k, v)
        out = masked_sdpa(x.replace(q=q))  # [B, Tq, Hs, Dv]: Hs / Hq of the work
        return out.repeat_interleave(x.heads // q.shape[2], dim=2), new_state

    # ---- state -------------------------------------------------------------------------------------

    def join_cache(self, x: AttentionInputs):
        return x, None  # the paths join the cache: it holds the reduced kv heads, which only they compute

    def _join(self, x: AttentionInputs, k: torch.Tensor, v: torch.Tensor) -> tuple[AttentionInputs, SQACache | None]:
        """Inputs whose k, v (the heads attention uses) follow the cached ones, and the next state (or None)."""
        if x.state is None and not x.want_state:
            return x.replace(k=k, v=v), None
        cache = x.state
        if cache is None or (cache.length == 0 and cache.k.shape[2] != k.shape[2]):
            cache = SQACache.empty(x.batch, k.shape[2], k.shape[-1], v.shape[-1], device=k.device, dtype=k.dtype)
        k, v, mask, nxt = cache.extend(k, v, x.key_padding_mask)
        return x.replace(k=k, v=v, key_padding_mask=mask, q_offset=cache.length, state=None), nxt

    def empty_state(self, batch, kv_heads, dk, dv, *, device=None, dtype=torch.float32) -> SQACache:
        """An empty cache (the first call swaps it for one with the heads attention uses, if they differ)."""
        return SQACache.empty(batch, kv_heads, dk, dv, device=device, dtype=dtype)

    def check_state(self, state, k: torch.Tensor, v: torch.Tensor) -> None:
        """Batch, head dims and device here; the head count once q is known (``check_call``)."""
        b, _, hkv, dk = k.shape
        want, got = (b, dk, v.shape[-1]), (state.k.shape[0], state.k.shape[3], state.v.shape[3])
        if got != want or hkv % state.k.shape[2]:
            raise ShapeError(
                f"state does not fit the inputs: it holds (batch, kv heads, dk, dv) = "
                f"{(got[0], state.k.shape[2], *got[1:])}, the call has {(b, hkv, dk, v.shape[-1])}"
            )
        if state.k.device != k.device:
            raise ShapeError(f"state is on {state.k.device} but k is on {k.device}")

    def state_bytes(self, shape: Shape, dtype: torch.dtype = torch.float32) -> int:
        elt = torch.empty(0, dtype=dtype).element_size()
        kept = self.layout(shape.heads, shape.kv_heads)[1]
        return shape.batch * shape.tk * kept * (shape.dk + shape.dv) * elt

    # ---- costs -------------------------------------------------------------------------------------

    def flops(self, shape: Shape, pattern: Pattern) -> float:
        """Attention over Hs heads only: Hs / Hq of softmax attention's FLOPs (the head means are additions)."""
        hs = self.query_heads(shape.heads)
        per_head = 2.0 * shape.tq * shape.tk * (shape.dk + shape.dv)
        return shape.batch * hs * per_head * causal_factor(shape, pattern)
