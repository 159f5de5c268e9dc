"""Mixture-of-Head attention — MoH: Multi-Head Attention as Mixture-of-Head Attention (Jin et al., 2024,
arXiv:2410.11842).

    O_t = sum_h g_{t,h} head_h(t) W_O^h,     heads 0..hs-1 shared (every token), the others routed (top-k)
    g_shared = a_1 * hs * softmax(W_s x_t),   g_routed = a_2 * k * renorm_topk(softmax(W_r x_t)),
    (a_1, a_2) = 2 * softmax(W_h x_t)                                   (two-stage routing)

as in the official code (SkyworkAI/MoH): the routed softmax is renormalised over the k chosen heads and
each group is scaled by its size, so gates average 1 like plain multi-head attention; one shared head
gets gate a_1. In the mechanism interface the router reads the token's queries (all heads' q at token
t, concatenated), and the output keeps the ``[B, T, Hq, Dv]`` contract: head h's output times g_{t,h},
zero for heads the token did not choose; the layer's W_O then sums the weighted heads. The top-k
choice is not differentiable: gradients reach the router through the gates of the chosen heads.

Paths: ``dense`` runs every head with SDPA and gates the result; ``gather`` computes only what is
used: the shared heads for every token, each routed head only for the tokens that chose it. ``auto``
takes gather where it was measured faster (noncausal calls of >= 1024 queries, see below).
The router is the ViT/DiT one (learned W_r, W_s, W_h); MoH-LLaMA3's norm-based gates are not modelled.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidOption, ShapeError
from ..inputs import AttentionInputs
from ..mechanism import Complexity, Mechanism, Paper, Shape, fast_path, register_mechanism
from ..ops.flops import causal_factor
from ..ops.masking import masked_softmax, visibility
from ..ops.reference import compute_dtype, upcast_qkv
from ..ops.sdpa import masked_sdpa
from ..options import check_int
from ..patterns import ALL_PATTERNS, Pattern
from ..state import KVCache

# Measured on the 2-core CPU (B=1, H=8, D=64, 4 shared + top-2 of 4 routed heads, fp32, one thread): at T = 4096
# gather takes 0.79 of SDPA's time noncausal (dense 1.02), but 1.04 causal (dense 1.01: a masked SDPA call over
# chosen queries skips less than the causal kernel); at T = 1024 0.92 vs 1.18 noncausal; at T = 256 it loses.
GATHER_MIN_TOKENS = 1024  # auto takes gather for noncausal calls with at least this many queries
ROUTED_CHUNK = 256  # causal: a routed head's chosen queries go in chunks that read keys up to the chunk's end


@dataclass(frozen=True)
class MoHOptions:
    shared_heads: int | None = None  # heads every token uses (the first ones); None: half the heads (MoH-LLaMA3)
    routed_heads: int | None = None  # k, heads each token picks among the others; None: a quarter of the heads

    def __post_init__(self):
        if self.shared_heads is not None:
            check_int("moh", "shared_heads", self.shared_heads, minimum=0)
        if self.routed_heads is not None:
            check_int("moh", "routed_heads", self.routed_heads)


@register_mechanism("moh")
class MoH(Mechanism):
    family = "head routing"
    paper = Paper("MoH: Multi-Head Attention as Mixture-of-Head Attention", 2024, "2410.11842")
    patterns = ALL_PATTERNS
    exact = False
    trainable = True
    state_kind = KVCache
    complexity = Complexity(time="O(Tq·Tk·D·(hs + k))", memory="O(Tq + Tk) fused (reference: O(H·Tq·Tk))")
    Options = MoHOptions
    example_options = ({"shared_heads": 1, "routed_heads": 1},)
    fidelity_knob = ("routed_heads", (1, 2))  # of the 2 routed heads of the fidelity sweep's 4 heads

    def __init__(self, heads: int | None = None, head_dim: int | None = None, **options):
        super().__init__(heads, head_dim, **options)
        hs = self.options.shared_heads if self.options.shared_heads is not None else heads // 2
        k = self.options.routed_heads if self.options.routed_heads is not None else max(1, heads // 4)
        if hs >= heads or k > heads - hs:
            raise InvalidOption(
                f"moh with {heads} heads: shared_heads={hs} must leave at least one routed head and "
                f"routed_heads={k} must be at most the {heads - hs} routed heads"
            )
        self.shared, self.topk = hs, k
        width = heads * head_dim  # the router reads all query heads of a token
        self.w_routed = nn.Linear(width, heads - hs, bias=False)  # W_r: scores of the routed heads
        self.w_shared = nn.Linear(width, hs, bias=False) if hs > 1 else None  # W_s: weights among shared heads
        self.w_mix = nn.Linear(width, 2, bias=False) if hs > 0 else None  # W_h: shared vs routed (two-stage)

    def check_call(self, x: AttentionInputs) -> None:
        super().check_call(x)
        if x.q.shape[-1] != self.head_dim:
            raise ShapeError(f"moh was created for head_dim={self.head_dim}; got q with head dim {x.q.shape[-1]}")

    # ---- routing -----------------------------------------------------------------------------------

    def route(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gates ``[B, Tq, H]`` (0 for heads a token does not use) and the used heads ``[B, Tq, H]`` bool.

        ``q`` is in the compute dtype; every path calls this same function, so all choose the same heads.
        """
        tok = q.flatten(2)  # [B, Tq, H*Dk]

        def linear(layer: nn.Linear) -> torch.Tensor:
            return tok @ layer.weight.to(tok.dtype).t()

        probs = linear(self.w_routed).softmax(-1)  # [B, Tq, Hr]
        chosen = torch.zeros_like(probs, dtype=torch.bool)
        chosen.scatter_(-1, probs.topk(self.topk, dim=-1).indices, True)  # top-k: not differentiable
        routed = probs * chosen
        eps = torch.finfo(routed.dtype).eps
        routed = routed / routed.sum(-1, keepdim=True).clamp(min=eps) * self.topk  # renormalised over the k
        if self.shared == 0:
            return routed, chosen
        shared = (
            linear(self.w_shared).softmax(-1) * self.shared
            if self.w_shared is not None
            else torch.ones_like(routed[..., :1])
        )  # [B, Tq, hs]
        alpha = 2.0 * linear(self.w_mix).softmax(-1)  # [B, Tq, 2]
        gates = torch.cat([alpha[..., :1] * shared, alpha[..., 1:] * routed], dim=-1)  # [B, Tq, H]
        used = torch.cat([torch.ones_like(chosen[..., : self.shared]), chosen], dim=-1)
        return gates, used

    # ---- the specification -------------------------------------------------------------------------

    def reference(self, x: AttentionInputs):
        q, k, v = upcast_qkv(x)  # [B, T, H, D], k and v repeated to the query heads
        gates, _ = self.route(q)  # [B, Tq, H]
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * x.scale  # [B, H, Tq, Tk]
        probs = masked_softmax(scores, visibility(x))
        heads = torch.einsum("bhqk,bkhd->bqhd", probs, v)  # [B, Tq, H, Dv]: every head
        out = heads * gates[..., None]  # g_{t,h} head_h(t); heads a token did not choose get 0
        return out.to(x.q.dtype), None

    # ---- fast paths --------------------------------------------------------------------------------

    def _compute(self, x: AttentionInputs) -> torch.dtype:
        return compute_dtype(x.q.dtype)

    @fast_path("dense", priority=10)
    def dense(self, x: AttentionInputs):
        """Every head through SDPA, then gated (the masked compute)."""
        gates, _ = self.route(x.q.to(self._compute(x)))
        out = masked_sdpa(x)  # [B, Tq, H, Dv]
        return (out.to(gates.dtype) * gates[..., None]).to(x.q.dtype), None

    @fast_path("gather", priority=lambda mech, x: 20 if x.tq >= GATHER_MIN_TOKENS and not x.pattern.is_causal else 0)
    def gather(self, x: AttentionInputs):
        """Compute of the used heads only: shared heads for all tokens, routed heads for their tokens."""
        gates, used = self.route(x.q.to(self._compute(x)))
        b, tq, h, _ = x.q.shape
        out = torch.zeros(b, tq, h, x.v.shape[-1], dtype=x.q.dtype, device=x.q.device)
        hs, g = self.shared, x.groups
        if hs:
            kv = torch.arange(hs, device=x.q.device) // g  # the kv head of each shared head
            k_s, v_s = x.k.index_select(2, kv), x.v.index_select(2, kv)  # [B, Tk, hs, D]
            out[:, :, :hs] = masked_sdpa(x.replace(q=x.q[:, :, :hs], k=k_s, v=v_s))
        causal = x.pattern is Pattern.CAUSAL_SELF
        for i in range(b):
            for head in range(hs, h):
                rows = used[i, :, head].nonzero().squeeze(1)  # [n] the tokens that chose this head
                if rows.numel() == 0:
                    continue
                kv = head // g
                pieces = rows.split(ROUTED_CHUNK) if causal else (rows,)
                for part in pieces:
                    out[i, part, head] = self._attend_rows(x, i, head, kv, part)
        return (out.to(gates.dtype) * gates[..., None]).to(x.q.dtype), None

    def _attend_rows(self, x: AttentionInputs, i: int, head: int, kv: int, rows: torch.Tensor) -> torch.Tensor:
        """Softmax attention of query rows ``rows`` of (batch row i, head) over the keys they see: ``[n, Dv]``."""
        causal = x.pattern is Pattern.CAUSAL_SELF
        end = int(rows[-1]) + x.q_offset + 1 if causal else x.tk  # later keys: no chosen query here sees them
        k, v = x.k[i, :end, kv], x.v[i, :end, kv]  # [Tk', D]
        mask = None
        if causal:
            mask = torch.arange(end, device=k.device)[None, :] <= (rows + x.q_offset)[:, None]  # [n, Tk']
        if x.key_padding_mask is not None:
            real = x.key_padding_mask[i, :end][None, :]  # [1, Tk']
            mask = real if mask is None else mask & real
        q = x.q[i, rows, head]  # [n, Dk]
        out = F.scaled_dot_product_attention(q[None, None], k[None, None], v[None, None], attn_mask=mask, scale=x.scale)
        out = out[0, 0]  # [n, Dv] (4-D inputs: the fused CPU kernel; 3-D ones take the materialising path)
        if mask is None:
            return out
        return torch.where(mask.any(-1, keepdim=True), out, torch.zeros((), dtype=out.dtype, device=out.device))

    # ---- costs -------------------------------------------------------------------------------------

    def flops(self, shape: Shape, pattern: Pattern) -> float:
        """Attention of the hs + k heads each token uses, plus the router's products."""
        per_head = 2.0 * shape.tq * shape.tk * (shape.dk + shape.dv) * causal_factor(shape, pattern)
        scores = (shape.heads - self.shared) + (self.shared if self.shared > 1 else 0) + (2 if self.shared else 0)
        router = 2.0 * shape.tq * shape.heads * shape.dk * scores
        return shape.batch * ((self.shared + self.topk) * per_head + router)
