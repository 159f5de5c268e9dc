"""Nyström attention — Nyströmformer: A Nyström-Based Algorithm for Approximating Self-Attention
(Xiong et al., 2021, arXiv:2102.03902).

With m landmarks Q~, K~ (segment means of q and k), and s the score scale:

    F = softmax(s Q K~^T)  [Tq, m],   A = softmax(s Q~ K~^T)  [m, m],   B = softmax(s Q~ K^T)  [m, Tk]
    out = F · pinv(A) · (B V),   pinv(A): the paper's iterative Moore-Penrose pseudo-inverse (pinv_iterations steps)

Choices where the paper is vague:
- Landmarks are means over contiguous segments of the *real* tokens (``ops/low_rank``): when m does not
  divide T the segments are ragged (sizes differ by at most one) rather than padding the sequence with zero
  tokens as the paper's code does, so no zero token enters a mean.
- T < m (or fewer real keys than m): every token is its own landmark; the empty landmarks drop out (their
  rows and columns of A are 0, so pinv works on the non-empty block, and F, B ignore them).
- Padded keys are left out of the key landmarks' means and of B's softmax. In self attention a padded
  position is no token, so it is left out of the query landmarks too; in cross attention the query
  landmarks are segment means of all queries (q has no padding).
- pinv's initial scaling uses the norms of each matrix, not a maximum over the whole batch (the paper's
  code), which would let one batch row change another's output.
- The paper's depthwise-convolution skip connection on v is a trainable extra outside attention: left out.

Causal patterns raise: every landmark averages over a segment, so it mixes the future into the past.

The ``sdpa`` path computes the same function in the efficient order: B V is one SDPA call (queries Q~ over
the keys), pinv(A) (B V) an m x m product, and F times that another SDPA call (queries Q over keys K~ with
values pinv(A) B V): O(T·m·D) time, O(T·D + m²) memory, no [T, T] or [T, m] tensor is kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..inputs import AttentionInputs
from ..mechanism import Complexity, Mechanism, Paper, Shape, fast_path, register_mechanism
from ..ops.low_rank import iterative_pinv, never_empty, segment_matrix, segment_means
from ..ops.masking import masked_softmax
from ..ops.reference import compute_dtype, upcast_qkv
from ..ops.sdpa import sdpa
from ..options import MAX_ITERATIONS, check_int
from ..patterns import Pattern


@dataclass(frozen=True)
class NystromOptions:
    num_landmarks: int = 64  # m, segment means of q and of k (the rank of the approximation)
    pinv_iterations: int = 6  # steps of the iterative pseudo-inverse of the m x m landmark kernel

    def __post_init__(self):
        check_int("nystrom", "num_landmarks", self.num_landmarks)
        check_int("nystrom", "pinv_iterations", self.pinv_iterations, minimum=0, maximum=MAX_ITERATIONS)


@register_mechanism("nystrom")
class Nystrom(Mechanism):
    family = "low-rank"
    paper = Paper("Nyströmformer: A Nyström-Based Algorithm for Approximating Self-Attention", 2021, "2102.03902")
    patterns = frozenset({Pattern.NONCAUSAL_SELF, Pattern.NONCAUSAL_CROSS})
    exact = False
    heads_independent = True
    complexity = Complexity(time="O(T·m·D + m³)", memory="O(T·D + m²)")
    Options = NystromOptions
    example_options = ({"num_landmarks": 8}, {"num_landmarks": 16, "pinv_iterations": 3})
    fidelity_knob = ("num_landmarks", (16, 32, 64, 128))

    def _query_mask(self, x: AttentionInputs) -> torch.Tensor | None:
        """Which queries enter the query landmarks: in self attention the real tokens, in cross all."""
        return x.key_padding_mask if x.pattern.is_self else None

    def reference(self, x: AttentionInputs):
        q, k, v = upcast_qkv(x)  # [B, Tq, H, Dk], [B, Tk, H, Dk], [B, Tk, H, Dv]
        m, b = self.options.num_landmarks, x.batch
        kpm = x.key_padding_mask
        pq = segment_matrix(self._query_mask(x), b, x.tq, m, q.device, q.dtype)  # [B|1, m, Tq]
        pk = segment_matrix(kpm, b, x.tk, m, q.device, q.dtype)  # [B|1, m, Tk]
        q_land = torch.einsum("bst,bthd->bhsd", pq.expand(b, -1, -1), q)  # [B, H, m, Dk]
        k_land = torch.einsum("bst,bthd->bhsd", pk.expand(b, -1, -1), k)  # [B, H, m, Dk]
        q_valid = (pq.sum(-1) > 0)[:, None]  # [B|1, 1, m]: non-empty query landmarks
        k_valid = (pk.sum(-1) > 0)[:, None]  # [B|1, 1, m]
        real = torch.ones(1, 1, x.tk, dtype=torch.bool, device=q.device) if kpm is None else kpm[:, None]

        s = x.scale
        f = masked_softmax(torch.einsum("bqhd,bhsd->bhqs", q, k_land) * s, k_valid[..., None, :])  # [B, H, Tq, m]
        a = masked_softmax(s * q_land @ k_land.transpose(-1, -2), q_valid[..., :, None] & k_valid[..., None, :])
        bk = masked_softmax(torch.einsum("bhsd,bkhd->bhsk", q_land, k) * s, q_valid[..., :, None] & real[..., None, :])
        weights = f @ iterative_pinv(a, self.options.pinv_iterations) @ bk  # [B, H, Tq, Tk]
        return torch.einsum("bhqk,bkhd->bqhd", weights, v).to(x.q.dtype), None

    @fast_path("sdpa")
    def sdpa(self, x: AttentionInputs):
        cdt = compute_dtype(x.q.dtype)
        q, k, v = (t.to(cdt) for t in (x.q, x.k, x.v))  # fp32 throughout (bf16 too): pinv is sensitive
        m, s, kpm = self.options.num_landmarks, x.scale, x.key_padding_mask
        q_land, q_valid = segment_means(q, self._query_mask(x), m)  # [B, m, Hq, Dk], [B|1, m]
        k_land, k_valid = segment_means(k, kpm, m)  # [B, m, Hkv, Dk]
        zero = torch.zeros((), dtype=cdt, device=q.device)

        # B V: the query landmarks attend to the real keys (one fused call); empty landmarks give 0
        key_mask = None if kpm is None else never_empty(kpm)[:, None, None, :]  # [B, 1, 1, Tk]
        bv = torch.where(q_valid[:, :, None, None], sdpa(q_land, k, v, scale=s, mask=key_mask), zero)  # [B, m, H, Dv]

        # pinv(A) (B V): m x m, per batch row and head
        a_scores = s * torch.einsum("bshd,bthd->bhst", q_land, _repeat_heads(k_land, x.groups))  # [B, H, m, m]
        a = masked_softmax(a_scores, q_valid[:, None, :, None] & k_valid[:, None, None, :])
        w = iterative_pinv(a, self.options.pinv_iterations) @ bv.transpose(1, 2)  # [B, H, m, Dv]

        # F (pinv(A) B V): the queries attend to the key landmarks with values w
        k_seen = never_empty(k_valid)[:, None, None, :]  # [B|1, 1, 1, m]
        out = sdpa(q, _repeat_heads(k_land, x.groups), w.transpose(1, 2), scale=s, mask=k_seen)  # [B, Tq, H, Dv]
        if kpm is not None:  # a row without a real key has no key landmark: 0 (without padding every row has one)
            out = torch.where(k_valid.any(-1)[:, None, None, None], out, zero)
        return out.to(x.q.dtype), None

    def flops(self, shape: Shape, pattern: Pattern) -> float:
        m, it = self.options.num_landmarks, self.options.pinv_iterations
        per_head = (
            shape.tq * m * (shape.dk + shape.dv)  # F and F w
            + m * shape.tk * (shape.dk + shape.dv)  # B and B V
            + m * m * (shape.dk + shape.dv)  # A and pinv(A) (B V)
            + it * 4 * m**3  # pinv: four m x m products per step
        )
        return 2.0 * shape.batch * shape.heads * per_head


def _repeat_heads(t: torch.Tensor, groups: int) -> torch.Tensor:
    """``[B, m, Hkv, D] -> [B, m, Hkv * groups, D]`` (the landmarks of a kv head, for each of its query heads)."""
    return t if groups == 1 else t.repeat_interleave(groups, dim=2)
