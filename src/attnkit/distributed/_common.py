"""Pieces the context-parallel strategies share: attention over one block of keys that also returns its log-sum-exp,
the exact backward of such a block given the MERGED output and log-sum-exp, and the merge itself
(research/C_kernels_distributed.md §1.3-§1.4).

Tensors here are heads first: ``q [B, Hq, Sq, Dk]``, ``k [B, Hkv, Sk, Dk]``, ``v [B, Hkv, Sk, Dv]`` (GQA: Hq a
multiple of Hkv), ``lse [B, Hq, Sq]``. Which keys a query sees is a :class:`BlockMask`. A query that sees no key of
the block gets ``out = 0`` and ``lse = -inf`` (the CPU flash kernel returns lse = 0 there: corrected here), so the
merge leaves it alone, and a query that sees no key at all ends with output 0, attnkit's contract.

Block compute: ``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward on CPU (fp64, fp32, bf16, fp16;
Dk = Dv), else a plain-PyTorch version (any device or dtype, Dk != Dv). On CUDA the plain version runs: no GPU
kernel path is written here (none could be tested when this was written).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_CPU_FLASH_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype outputs are merged and log-sum-exps kept in: fp64 stays fp64, everything else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class BlockMask:
    """Which keys of a block each query sees: all of them, minus what each part given hides.

    ``causal``: query i sees keys j <= i (top-left aligned; only for Sq == Sk). ``pairs [Sq, Sk]`` bool: True where
    the pair is visible. ``keys [B, Sk]`` bool: True for real keys (key padding).
    """

    causal: bool = False
    pairs: torch.Tensor | None = None
    keys: torch.Tensor | None = None

    @property
    def is_full(self) -> bool:
        return not self.causal and self.pairs is None and self.keys is None

    def visible(self, sq: int, sk: int, device: torch.device) -> torch.Tensor | None:
        """``[B|1, 1, Sq, Sk]`` bool of the visible pairs (None: all visible)."""
        if self.is_full:
            return None
        vis = torch.ones(sq, sk, dtype=torch.bool, device=device)
        if self.causal:
            vis = vis.tril()
        if self.pairs is not None:
            vis = vis & self.pairs
        vis = vis[None, None]
        return vis if self.keys is None else vis & self.keys[:, None, None, :]

    def seen_rows(self, sq: int, sk: int, device: torch.device) -> torch.Tensor | None:
        """``[B|1, 1, Sq]`` bool: the queries that see at least one key (None: all of them)."""
        if self.pairs is None and self.keys is None:
            return None  # full, or causal: every query sees its own key
        if self.pairs is None and self.causal:  # keys padded: query i sees a key iff one of 0..i is real
            return (self.keys.cumsum(-1) > 0)[:, None, :sq]
        return self.visible(sq, sk, device).any(-1)

    def additive(self, sq: int, sk: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
        """The pairs and keys parts as an additive float mask (0 or -inf) ``[B|1, 1, Sq|1, Sk]``; causal is left to
        the kernel's flag."""
        if self.pairs is None and self.keys is None:
            return None
        vis = torch.ones(1, 1, 1, sk, dtype=torch.bool, device=device)
        if self.pairs is not None:
            vis = vis & self.pairs[None, None]
        if self.keys is not None:
            vis = vis & self.keys[:, None, None, :]
        zero = torch.zeros((), dtype=dtype, device=device)
        return torch.where(vis, zero, torch.full((), float("-inf"), dtype=dtype, device=device))


def _cpu_flash_takes(q: torch.Tensor, v: torch.Tensor) -> bool:
    return q.device.type == "cpu" and q.dtype in _CPU_FLASH_DTYPES and q.shape[-1] == v.shape[-1]


def block_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockMask, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of ``q`` over this block's keys: (out ``[B, Hq, Sq, Dv]`` in q's dtype, lse ``[B, Hq, Sq]``
    in :func:`stats_dtype`). Queries that see no key of the block: out 0, lse -inf."""
    sq, sk = q.shape[2], k.shape[2]
    if _cpu_flash_takes(q, v):
        bias = mask.additive(sq, sk, q.dtype, q.device)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, mask.causal, attn_mask=bias, scale=scale
        )
        lse = lse.to(stats_dtype(q.dtype))
    else:
        out, lse = _plain_forward(q, k, v, mask, scale)
    seen = mask.seen_rows(sq, sk, q.device)
    if seen is not None:  # the kernel's lse = 0 for a query seeing nothing would count as a key of weight 1
        lse = lse.masked_fill(~seen, float("-inf"))
        out = out.masked_fill(~seen[..., None], 0)
    return out, lse


def block_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    mask: BlockMask,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This block's exact share of (dq, dk, dv), given the MERGED ``out`` and ``lse`` of the queries over every
    block (the weights exp(s - lse) are then the global ones). dk, dv have k's heads (GQA groups summed)."""
    lse = lse.masked_fill(lse == float("-inf"), 0)  # queries seeing no key anywhere: no gradient, and no NaN
    if _cpu_flash_takes(q, v):
        sq, sk = q.shape[2], k.shape[2]
        bias = mask.additive(sq, sk, q.dtype, q.device)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout.to(q.dtype), q, k, v, out.to(q.dtype), lse.float() if q.dtype != torch.float64 else lse,
            0.0, mask.causal, attn_mask=bias, scale=scale,
        )  # fmt: skip
    return _plain_backward(dout, q, k, v, out, lse, mask, scale)


def merge(
    out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold one block's (out, lse) into the running (out, lse) (stats dtype), the stable sigmoid form (ring-flash-
    attention PR #34, torch CP, NATTEN). Either side may be -inf (nothing seen yet, or nothing in the block).
    Returns new tensors; :func:`merge_` updates ``out`` and ``lse`` in place (no temporaries the size of out)."""
    out, lse = out.clone(), lse.clone()
    merge_(out, lse, block_out, block_lse)
    return out, lse


def merge_(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor) -> None:
    """:func:`merge` in place: ``out [..., S, Dv]`` and ``lse [..., S]`` (views allowed) become the merged ones."""
    diff = block_lse - lse  # [B, H, S]
    diff = torch.where(torch.isnan(diff), float("-inf"), diff)  # both -inf: the block adds nothing
    weight = torch.sigmoid(diff)[..., None]  # e^{lse_b} / (e^{lse} + e^{lse_b})
    step = block_out.to(out.dtype) - out
    out.add_(step.mul_(weight))  # out + w (block_out - out)
    lse.copy_(torch.logaddexp(lse, block_lse))


# ---- the plain-PyTorch block (any device, dtype, Dk != Dv) -------------------------------------------------------


def _scores(q: torch.Tensor, k: torch.Tensor, mask: BlockMask, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores ``[B, Hq, Sq, Sk]`` in the stats dtype with hidden pairs at -inf, and k repeated to q's heads."""
    groups = q.shape[1] // k.shape[1]
    compute = stats_dtype(q.dtype)
    kk = k.to(compute).repeat_interleave(groups, dim=1)
    s = (q.to(compute) @ kk.mT) * scale
    vis = mask.visible(q.shape[2], k.shape[2], q.device)
    return (s if vis is None else s.masked_fill(~vis, float("-inf"))), kk


def _plain_forward(q, k, v, mask: BlockMask, scale: float):
    groups = q.shape[1] // k.shape[1]
    s, _ = _scores(q, k, mask, scale)
    lse = torch.logsumexp(s, dim=-1)  # -inf where nothing is seen
    p = torch.exp(s - lse.masked_fill(lse == float("-inf"), 0)[..., None])
    out = p @ v.to(s.dtype).repeat_interleave(groups, dim=1)
    return out.to(q.dtype), lse


def _plain_backward(dout, q, k, v, out, lse, mask: BlockMask, scale: float):
    b, hkv, sk, _ = k.shape
    groups = q.shape[1] // hkv
    s, kk = _scores(q, k, mask, scale)
    compute = s.dtype
    p = torch.exp(s - lse.to(compute)[..., None])  # the GLOBAL weights of this block's pairs
    do, vv = dout.to(compute), v.to(compute).repeat_interleave(groups, dim=1)
    dv = p.mT @ do  # [B, Hq, Sk, Dv]
    delta = (do * out.to(compute)).sum(-1, keepdim=True)  # D_i = rowsum(dO * O)
    ds = p * (do @ vv.mT - delta)
    dq = (ds @ kk) * scale
    dk = (ds.mT @ q.to(compute)) * scale

    def fold(t: torch.Tensor) -> torch.Tensor:  # sum the query heads of each kv head
        return t.view(b, hkv, groups, sk, t.shape[-1]).sum(2)

    return dq.to(q.dtype), fold(dk).to(k.dtype), fold(dv).to(v.dtype)
