"""Hedgehog — The Hedgehog & the Porcupine: Expressive Linear Attentions with Softmax Mimicry
(Zhang et al., 2024, arXiv:2402.04347).

Linear attention with a trainable feature map per head h, trained to mimic softmax attention:

    phi_h(x) = [softmax(W_h x + b_h), softmax(-(W_h x + b_h))]        (W_h: [F, D], so phi has 2F entries)
    out_i = sum_j phi(q_i).phi(k_j) v_j / (sum_j phi(q_i).phi(k_j) + eps)

``W_h`` starts as the identity (rectangular when F != D) and ``b_h`` at zero, as in the paper's code.
:func:`distill_attention` is the paper's attention distillation: the cross-entropy between the softmax
weights of a teacher's q, k and the student's normalised weights phi(q_i).phi(k_j) / sum_j'.
No softmax scale (the map is learned; the distillation loss takes the teacher's).

Heads and GQA: one map per query head, applied to the queries of that head and to the keys it reads.
Under GQA (Hq = G Hkv) the G query heads that share a key head each featurise those keys with their
own map, so the output always equals repeating k, v (the conversion recipe of the paper's follow-up,
LoLCATs, does the same). The price is a recurrent state per query head, ``[B, Hq, 2F, Dv]``: G times
the state of a map per kv head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import ShapeError
from ..inputs import AttentionInputs, check_scale, validate
from ..mechanism import Complexity, Paper, Shape, fast_path, register_mechanism
from ..ops.chunked import DEFAULT_CHUNK
from ..ops.gqa import repeat_kv
from ..ops.masking import visibility
from ..options import check_float, check_int
from ..patterns import ALL_PATTERNS, Pattern
from ..state import RecurrentState, State
from ._kernel_base import KernelAttention


@dataclass(frozen=True)
class HedgehogOptions:
    feature_dim: int | None = None  # F, outputs of each head's map (phi has 2F entries); None: the head dim
    eps: float = 1e-6  # added to the normaliser so a query that sees no key gets 0, not NaN
    chunk_size: int = DEFAULT_CHUNK  # tokens per chunk of the causal chunk path (speed only)

    def __post_init__(self):
        if self.feature_dim is not None:
            check_int("hedgehog", "feature_dim", self.feature_dim)
        check_float("hedgehog", "eps", self.eps, positive=True)
        check_int("hedgehog", "chunk_size", self.chunk_size)


@register_mechanism("hedgehog")
class Hedgehog(KernelAttention):
    family = "kernel"
    paper = Paper("The Hedgehog & the Porcupine: Expressive Linear Attentions with Softmax Mimicry", 2024, "2402.04347")
    patterns = ALL_PATTERNS
    exact = False
    trainable = True
    uses_scale = False
    complexity = Complexity(time="O(T·F·D)", memory="O(T·F) (state O(F·D) per query head)")
    Options = HedgehogOptions
    example_options = ({}, {"feature_dim": 8, "chunk_size": 16})
    fidelity_knob = None  # the map is learned: untrained, its distance from softmax says little

    def __init__(self, heads: int | None = None, head_dim: int | None = None, **options: Any):
        super().__init__(heads, head_dim, **options)
        self.feature_dim = self.options.feature_dim or head_dim
        eye = torch.eye(self.feature_dim, head_dim)  # identity init, as in the paper's code
        self.weight = nn.Parameter(eye.repeat(heads, 1, 1))  # [H, F, D]
        self.bias = nn.Parameter(torch.zeros(heads, self.feature_dim))  # [H, F]

    def check_call(self, x: AttentionInputs) -> None:
        super().check_call(x)
        if x.q.shape[-1] != self.head_dim:
            raise ShapeError(f"hedgehog was created for head_dim {self.head_dim}; got q with head dim {x.q.shape[-1]}")

    # ---- the feature map ---------------------------------------------------------------------------

    def feature_map(self, t: torch.Tensor) -> torch.Tensor:
        """``t [B, T, H, D]`` (H = the created heads) -> ``[B, T, H, 2F]``: [softmax(Wt + b), softmax(-(Wt + b))]."""
        w, b = self.weight.to(t.dtype), self.bias.to(t.dtype)
        z = torch.einsum("bthd,hfd->bhtf", t, w) + b[:, None, :]  # [B, H, T, F]
        # [B, T, H, 2F], a view of [B, H, T, 2F]: heads first, so the chunked scan needs no copy
        return torch.cat([z.softmax(-1), (-z).softmax(-1)], dim=-1).transpose(1, 2)

    def features(self, x: AttentionInputs, role: str) -> torch.Tensor:
        t = (x.q if role == "q" else x.k).to(self.compute_dtype(x))
        if t.shape[2] != self.heads:
            raise ShapeError(f"hedgehog features need {self.heads} heads; got {t.shape[2]} (expand kv heads first)")
        return self.feature_map(t)

    def per_query_head(self, x: AttentionInputs) -> AttentionInputs:
        """Keys and values repeated to the query heads: every query head featurises keys with its own map."""
        if x.groups == 1:
            return x
        return x.replace(k=repeat_kv(x.k, x.groups), v=repeat_kv(x.v, x.groups))

    # ---- paths: KernelAttention's, on keys expanded to the query heads -----------------------------

    def reference(self, x: AttentionInputs):
        return super().reference(self.per_query_head(x))

    @fast_path("associative", priority=10)
    def associative(self, x: AttentionInputs):
        return KernelAttention.associative(self, self.per_query_head(x))

    @associative.unsupported
    def associative(self, x: AttentionInputs) -> list[str]:
        return KernelAttention.associative.not_supported_reasons(self, x)

    @fast_path("chunk", priority=10)
    def chunk(self, x: AttentionInputs):
        return KernelAttention.chunk(self, self.per_query_head(x))

    @chunk.unsupported
    def chunk(self, x: AttentionInputs) -> list[str]:
        return KernelAttention.chunk.not_supported_reasons(self, x)

    @fast_path("recurrent", priority=lambda mech, x: KernelAttention.recurrent.rank(mech, x))
    def recurrent(self, x: AttentionInputs):
        return KernelAttention.recurrent(self, self.per_query_head(x))

    @recurrent.unsupported
    def recurrent(self, x: AttentionInputs) -> list[str]:
        return KernelAttention.recurrent.not_supported_reasons(self, x)

    # ---- state: one per query head -----------------------------------------------------------------

    def empty_state(self, batch, kv_heads, dk, dv, *, device=None, dtype=torch.float32) -> RecurrentState:
        """The empty state: ``S [B, Hq, 2F, Dv]`` (``kv_heads`` is not used: the state is per query head)."""
        return RecurrentState.zeros(batch, self.heads, self.state_dk(dk), dv, device=device)

    def check_state(self, state: State, k: torch.Tensor, v: torch.Tensor) -> None:
        assert isinstance(state, RecurrentState)
        want = (k.shape[0], self.heads, self.state_dk(k.shape[-1]), v.shape[-1])
        state.check_fits("batch, heads, 2F, dv", tuple(state.S.shape), want, k.device)

    def state_dk(self, dk: int) -> int:
        return 2 * self.feature_dim

    def flops(self, shape: Shape, pattern: Pattern) -> float:
        kernel = super().flops(shape._replace(kv_heads=shape.heads), pattern)  # keys featurised per query head
        maps = 2.0 * shape.batch * shape.heads * (shape.tq + shape.tk) * self.feature_dim * shape.dk
        return kernel + maps


def distill_attention(
    teacher_q: torch.Tensor,
    teacher_k: torch.Tensor,
    student: Hedgehog,
    *,
    pattern: Pattern | str = "causal_self",
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """The attention-distillation loss of Hedgehog: a scalar to minimise over the student's feature maps.

    ``teacher_q [B, Tq, H, D]``, ``teacher_k [B, Tk, Hkv, D]``: the teacher's softmax weights
    ``softmax(q k^T * scale)`` (``scale`` defaults to 1/sqrt(D); masked by ``pattern`` and
    ``key_padding_mask``) are the targets, without gradient. The student's weights are its normalised
    linear-attention weights ``phi(q_i).phi(k_j) / sum_j' phi(q_i).phi(k_j')`` over the same visible keys.
    Returns the cross-entropy ``-sum_j A_ij log A'_ij``, averaged over batch, heads and the queries
    that see at least one key. Memory is O(Tq Tk), as for the teacher's weights.
    """
    if not isinstance(student, Hedgehog):
        raise TypeError(f"student must be a hedgehog mechanism; got {type(student).__name__}")
    x = validate(student, teacher_q, teacher_k, teacher_k, pattern=pattern, scale=None,
                 key_padding_mask=key_padding_mask, state=None, return_state=False, spatial_shape=None)  # fmt: skip
    student.check_call(x)
    x = student.per_query_head(x)
    if scale is not None:
        check_scale(scale)
    scale = x.scale if scale is None else float(scale)
    seen = visibility(x)  # [B or 1, 1, Tq, Tk] or None
    dtype = student.compute_dtype(x)
    q, k = x.q.to(dtype), x.k.to(dtype)
    with torch.no_grad():
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale  # [B, H, Tq, Tk]
        if seen is not None:
            scores = scores.masked_fill(~seen, float("-inf"))
        target = scores.softmax(-1).nan_to_num(0.0)  # rows that see no key: all zero
    a = torch.einsum("bqhf,bkhf->bhqk", student.features(x, "q"), student.features(x, "k"))  # [B, H, Tq, Tk]
    if seen is not None:
        a = a * seen
    tiny = torch.finfo(dtype).tiny  # keeps log and division finite where a row or weight is 0
    probs = a / a.sum(-1, keepdim=True).clamp_min(tiny)  # [B, H, Tq, Tk]
    ce = -(target * probs.clamp_min(tiny).log()).sum(-1)  # [B, H, Tq]
    rows = target.sum(-1) > 0  # queries that see at least one key
    return (ce * rows).sum() / rows.sum().clamp_min(1)
