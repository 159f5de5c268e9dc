"""Channel attention — DaViT: Dual Attention Vision Transformers (Ding et al., 2022, arXiv:2204.03645), and
the cross-covariance attention of XCiT: Cross-Covariance Image Transformers (El-Nouby et al., 2021,
arXiv:2106.09681) as the ``normalize`` option. Attention over channels, not tokens, per head:

    A = softmax_j(scale * sum_t k~[t, i] v~[t, j])      [Dk x Dv], the keys' and values' channel covariance
    out[n, i] = sum_j A[i, j] q[n, j]                   (tokens meet only through the D x D matrix: O(T·D²))

DaViT (the default): k~ = k, v~ = v, scale = 1/sqrt(Dk). XCiT (``normalize=True``): k~, v~ are L2-normalised
along the tokens (each channel of the sequence a unit vector), and the scale plays the role of XCiT's
temperature tau. Choices where the papers leave room:
- The arrangement is DaViT's (``attn = (k * scale)^T @ v; attn.softmax(-1); x = (attn @ q^T)^T``): the D x D
  matrix is made from k and v and applied to the queries. XCiT writes the same operation with the roles of
  the three projections renamed (its matrix is made from q and k and applied to v); attnkit keeps DaViT's so that
  ``noncausal_cross`` is defined: the matrix summarises the context (Tk tokens) and the Tq queries read it out,
  and on one sequence cross equals self. The output channel i is a key channel and the queries are mixed
  over value channels, so Dk == Dv is required (a ``ShapeError`` otherwise).
- XCiT learns tau per head (initialised to 1); here tau is the call's ``scale`` (one number; pass ``scale=1.0``
  for XCiT's initial value). A learned per-head tau is not offered.
- Key padding: padded tokens are left out of the token sums (and of XCiT's norms). A batch row with no real
  key has no matrix: its outputs are 0.
- GQA: the matrix depends on k and v only, so it is computed once per key/value head and shared by the query
  heads of its group (the same as repeating k and v).
- It works on any sequence (no grid), so ``spatial = False``: ``spatial_shape`` may be passed and is only
  checked. Causal patterns are not offered: the papers define none (a running sum of K^T V would give a causal
  form, as in linear attention, but not theirs), and ``causal_cross`` would equal ``noncausal_cross`` here (the
  queries never meet each other) but is left out as in the catalogue.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import InvalidOption, ShapeError
from ..inputs import AttentionInputs
from ..mechanism import Complexity, Mechanism, Paper, Shape, fast_path, register_mechanism
from ..ops.gqa import group_queries
from ..ops.reference import compute_dtype, upcast_qkv
from ..patterns import Pattern

_NORM_EPS = 1e-12  # F.normalize's default, as XCiT calls it


@dataclass(frozen=True)
class ChannelOptions:
    normalize: bool = False  # XCiT: L2-normalise k and v along the tokens (the scale is then XCiT's temperature)

    def __post_init__(self):
        if not isinstance(self.normalize, bool):
            raise InvalidOption(f"channel option normalize={self.normalize!r} is not valid; expected True or False")


@register_mechanism("channel")
class Channel(Mechanism):
    family = "spatial, transposed"
    paper = Paper("DaViT: Dual Attention Vision Transformers", 2022, "2204.03645")
    patterns = frozenset({Pattern.NONCAUSAL_SELF, Pattern.NONCAUSAL_CROSS})
    exact = False
    heads_independent = True
    complexity = Complexity(time="O(T·D²)", memory="O(T·D + D²)")
    Options = ChannelOptions
    example_options = ({}, {"normalize": True})

    def check_call(self, x: AttentionInputs) -> None:
        super().check_call(x)
        dk, dv = x.k.shape[-1], x.v.shape[-1]
        if dk != dv:
            raise ShapeError(
                f"channel mixes the queries over value channels into key channels, so it needs Dk == Dv; "
                f"got Dk={dk}, Dv={dv}"
            )

    def _channels(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v as the covariance uses them: XCiT normalises each channel over the (real) tokens, axis 1."""
        if not self.options.normalize:
            return k, v
        return F.normalize(k, dim=1, eps=_NORM_EPS), F.normalize(v, dim=1, eps=_NORM_EPS)

    @staticmethod
    def _zero_empty_rows(x: AttentionInputs, out: torch.Tensor) -> torch.Tensor:
        """Batch rows whose keys are all padded output 0 (they have no matrix), selected, not multiplied."""
        if x.key_padding_mask is None:
            return out
        any_key = x.key_padding_mask.any(dim=1)[:, None, None, None]  # [B, 1, 1, 1]
        return torch.where(any_key, out, torch.zeros((), dtype=out.dtype, device=out.device))

    def reference(self, x: AttentionInputs):
        q, k, v = upcast_qkv(x)  # [B, Tq, H, D], [B, Tk, H, D] (k, v repeated to the query heads)
        # padded tokens are out of the token sums: validate() zeroed their k and v rows (by selection)
        k, v = self._channels(k, v)
        out = torch.zeros_like(q)  # [B, Tq, H, D]
        for h in range(x.heads):
            kh, vh, qh = k[:, :, h], v[:, :, h], q[:, :, h]  # [B, T, D]
            attn = (kh.transpose(1, 2) @ vh) * x.scale  # [B, Dk, Dv]: K^T V, a sum over the tokens
            attn = attn.softmax(dim=-1)  # each key channel's weights over the value channels
            out[:, :, h] = (attn @ qh.transpose(1, 2)).transpose(1, 2)  # (A Q^T)^T: [B, Tq, Dk]
        return self._zero_empty_rows(x, out).to(x.q.dtype), None

    @fast_path("matmul", priority=10)
    def matmul(self, x: AttentionInputs):
        compute = compute_dtype(x.q.dtype)
        k, v = self._channels(x.k.to(compute), x.v.to(compute))  # [B, Tk, Hkv, D]: no repeat for GQA
        attn = torch.einsum("bthi,bthj->bhij", k, v).mul_(x.scale).softmax(dim=-1)  # [B, Hkv, Dk, Dv]
        q = group_queries(x.q.to(compute), x.kv_heads)  # [B, Tq, Hkv, G, D]
        out = torch.einsum("bhij,bnhgj->bnhgi", attn, q)  # [B, Tq, Hkv, G, Dk]
        return self._zero_empty_rows(x, out.reshape(x.q.shape)).to(x.q.dtype), None

    def flops(self, shape: Shape, pattern: Pattern) -> float:
        covariance = shape.kv_heads * shape.tk * shape.dk * shape.dv  # K^T V per key/value head
        readout = shape.heads * shape.tq * shape.dk * shape.dv  # A Q^T per query head
        return 2.0 * shape.batch * (covariance + readout)
