"""Linformer — Linformer: Self-Attention with Linear Complexity (Wang et al., 2020, arXiv:2006.04768).

Trainable length projections E, F [proj_len, max_len] shrink the keys and values along the sequence:

    K' = E K,   V' = F V   [proj_len, D],      out = softmax(s Q K'^T) V'

Choices where the paper is vague:
- ``sharing``: "none" gives every query head its own E and F; "headwise" (default, as linformer-pytorch)
  one E and one F for all heads; "key_value" one matrix for both and all heads (the paper's variants).
- Tk < max_len: the first Tk columns of E and F are used (as the paper's code does for shorter inputs);
  Tk > max_len raises ShapeError before any compute.
- Padded keys are left out as if removed: the real keys are projected by the first columns of E and F in
  their order (a row's i-th real key meets column i), and padded keys are zeroed, so padding at either end
  changes nothing. A row with no real key projects to K' = V' = 0 and gives 0.
- Init: E, F ~ N(0, 1/proj_len) (the paper's JL-style random projection).
- causal_cross is well defined (DESIGN marks it —): K' and V' depend only on the context, never on another
  query, so every query's output is a function of itself and the context, which is CC's contract. causal_self
  raises: a projection over the length mixes future keys into every projected key.

The ``sdpa`` path projects with one matmul each (O(Tk·proj_len·D)) and runs SDPA over the proj_len projected
keys (O(Tq·proj_len·D)): linear in T, no [Tq, Tk] tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ShapeError
from ..inputs import AttentionInputs
from ..mechanism import Complexity, Mechanism, Paper, Shape, fast_path, register_mechanism
from ..ops.gqa import repeat_kv
from ..ops.low_rank import compact_order, gather_tokens, real_ranks
from ..ops.reference import compute_dtype, upcast_qkv
from ..ops.sdpa import sdpa
from ..options import check_choice, check_int
from ..patterns import Pattern

SHARING = ("none", "headwise", "key_value")


@dataclass(frozen=True)
class LinformerOptions:
    proj_len: int = 256  # k in the paper: the keys and values are projected to this many rows
    max_len: int = 4096  # longest key sequence (columns of E and F); longer inputs raise
    sharing: str = "headwise"  # none: E, F per head; headwise: one E, F for all heads; key_value: E = F too

    def __post_init__(self):
        check_int("linformer", "proj_len", self.proj_len)
        check_int("linformer", "max_len", self.max_len)
        check_choice("linformer", "sharing", self.sharing, SHARING)


@register_mechanism("linformer")
class Linformer(Mechanism):
    family = "low-rank"
    paper = Paper("Linformer: Self-Attention with Linear Complexity", 2020, "2006.04768")
    patterns = frozenset({Pattern.NONCAUSAL_SELF, Pattern.NONCAUSAL_CROSS, Pattern.CAUSAL_CROSS})
    exact = False
    trainable = True
    complexity = Complexity(time="O(T·k·D)", memory="O(T·D + k·max_len) (parameters: k·max_len)")
    Options = LinformerOptions
    example_options = ({"proj_len": 8, "max_len": 256}, {"proj_len": 16, "max_len": 256, "sharing": "none"})
    fidelity_knob = ("proj_len", (64, 128, 256))

    def __init__(self, heads: int | None = None, head_dim: int | None = None, **options):
        super().__init__(heads, head_dim, **options)
        o = self.options
        n = heads if o.sharing == "none" else 1
        std = 1.0 / math.sqrt(o.proj_len)
        self.proj_k = nn.Parameter(torch.randn(n, o.proj_len, o.max_len) * std)  # E [heads|1, k, max_len]
        self.proj_v = None if o.sharing == "key_value" else nn.Parameter(torch.randn(n, o.proj_len, o.max_len) * std)

    def check_call(self, x: AttentionInputs) -> None:
        super().check_call(x)
        if x.tk > self.options.max_len:
            raise ShapeError(f"linformer was created with max_len={self.options.max_len}; got {x.tk} keys")

    def _projections(self, tk: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """E, F restricted to the first Tk columns: ``[heads|1, k, Tk]`` each."""
        e = self.proj_k[..., :tk].to(dtype)
        f = e if self.proj_v is None else self.proj_v[..., :tk].to(dtype)
        return e, f

    def _kv_heads(self, x: AttentionInputs, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head projections act on the query heads: repeat k, v for them (GQA)."""
        if self.options.sharing == "none":
            return repeat_kv(k, x.groups), repeat_kv(v, x.groups)
        return k, v

    def reference(self, x: AttentionInputs):
        q, k, v = upcast_qkv(x)  # [B, Tq, H, Dk], [B, Tk, H, Dk], [B, Tk, H, Dv]
        e, f = self._projections(x.tk, q.dtype)  # [H|1, k, Tk]
        # the real key of rank r meets column r; padded keys meet none: E_b [B, H|1, k, Tk]
        rank, _ = real_ranks(x.key_padding_mask, x.batch, x.tk, q.device)  # [B|1, Tk]
        e_b, f_b = (p[None, :, :, :].expand(rank.shape[0], -1, -1, -1) for p in (e, f))
        index = rank[:, None, None, :].expand(-1, e.shape[0], e.shape[1], -1)
        e_b, f_b = torch.gather(e_b, 3, index), torch.gather(f_b, 3, index)
        if x.key_padding_mask is not None:
            real = x.key_padding_mask[:, None, None, :]
            e_b, f_b = torch.where(real, e_b, 0.0), torch.where(real, f_b, 0.0)
        k_proj = torch.einsum("bhpt,bthd->bhpd", e_b, k)  # [B, H, k, Dk]
        v_proj = torch.einsum("bhpt,bthd->bhpd", f_b, v)  # [B, H, k, Dv]
        probs = (torch.einsum("bqhd,bhpd->bhqp", q, k_proj) * x.scale).softmax(-1)  # [B, H, Tq, k]
        return torch.einsum("bhqp,bhpd->bqhd", probs, v_proj).to(x.q.dtype), None

    @fast_path("sdpa")
    def sdpa(self, x: AttentionInputs):
        cdt = compute_dtype(x.q.dtype)
        k, v = self._kv_heads(x, x.k, x.v)
        if x.key_padding_mask is not None:  # real keys first (padded rows are zero): column i meets real key i
            order = compact_order(x.key_padding_mask)
            k, v = gather_tokens(k, order), gather_tokens(v, order)
        e, f = self._projections(x.tk, cdt)  # [H|1, k, Tk]
        k_proj = _project(e, k.to(cdt))  # [B, k, H', Dk]
        v_proj = _project(f, v.to(cdt))  # [B, k, H', Dv]
        out = sdpa(x.q.to(cdt), k_proj, v_proj, scale=x.scale)  # [B, Tq, Hq, Dv]
        return out.to(x.q.dtype), None

    def flops(self, shape: Shape, pattern: Pattern) -> float:
        p = self.options.proj_len
        heads = shape.heads if self.options.sharing == "none" else shape.kv_heads
        project = heads * p * shape.tk * (shape.dk + shape.dv)
        attend = shape.heads * shape.tq * p * (shape.dk + shape.dv)
        return 2.0 * shape.batch * (project + attend)


def _project(proj: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``proj [H|1, k, T] x t [B, T, H, D] -> [B, k, H, D]``: one batched matmul per head."""
    b, n, h, d = t.shape
    if proj.shape[0] == 1:  # shared by the heads: per batch row one [k, T] x [T, H*D] product, no copy of t
        return torch.matmul(proj[0], t.reshape(b, n, h * d)).view(b, -1, h, d)
    return torch.einsum("hpt,bthd->bphd", proj, t)
