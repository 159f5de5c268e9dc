"""Sigmoid attention as Triton kernels (FlashSigmoid-style): no T x T tensor, no row statistics.

    out_i = sum_j sigmoid(scale * q_i . k_j + bias_i) v_j      over the keys query i may see

Forward: one program per (query block, batch*head) walks the key blocks and accumulates in fp32.
Backward recomputes the weights block by block: one kernel for dK, dV (per key block, walking the
query blocks), one for dQ (per query block, walking the key blocks); with P = sigmoid(S),
dV = P^T dO, dS = (dO V^T) * P * (1 - P), dQ = scale dS K, dK = scale dS^T Q. Grouped-query heads
write dK, dV per query head and are summed afterwards (no atomics).

Tensors keep attnkit's [B, T, H, D] layout (strides are passed; nothing is transposed). Runs on CUDA,
and on CPU tensors under TRITON_INTERPRET=1 (slow; used by the tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _weights(q, k, bias, offs_m, offs_n, valid_ptr, Tk, scale, causal_offset,
             HAS_VALID: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr):  # fmt: skip
    """sigmoid(scale q k^T + bias) for one tile, 0 where a key may not be seen: [BLOCK_M, BLOCK_N] fp32."""
    s = tl.dot(q, k, input_precision=PRECISION) * scale + bias[:, None]
    keep = offs_n[None, :] < Tk
    if CAUSAL:
        keep = keep & (offs_n[None, :] <= offs_m[:, None] + causal_offset)
    if HAS_VALID:
        real = tl.load(valid_ptr + offs_n, mask=offs_n < Tk, other=0)
        keep = keep & (real[None, :] != 0)
    return tl.where(keep, tl.sigmoid(s), 0.0)


@triton.jit
def _fwd(Q, K, V, BIAS, VALID, OUT,
         sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sob, sot, soh, sbb, svab,
         H, G, Tq, Tk, D, E, scale, causal_offset,
         HAS_VALID: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr):  # fmt: skip
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // H, pid_bh % H
    hk = h // G  # the kv head of this query head
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d, offs_e = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_E)
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :],
                mask=(offs_m[:, None] < Tq) & (offs_d[None, :] < D), other=0.0)  # fmt: skip
    bias = tl.load(BIAS + b * sbb + offs_m, mask=offs_m < Tq, other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_E], dtype=tl.float32)
    end = Tk
    if CAUSAL:  # keys after the block's last query are never seen
        end = tl.minimum(Tk, (pid_m + 1) * BLOCK_M + causal_offset)
    for start in range(0, end, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        k = tl.load(
            K + b * skb + hk * skh + offs_n[None, :] * skt + offs_d[:, None],
            mask=(offs_n[None, :] < Tk) & (offs_d[:, None] < D),
            other=0.0,
        )  # [BLOCK_D, BLOCK_N]
        p = _weights(q, k, bias, offs_m, offs_n, VALID + b * svab, Tk, scale, causal_offset,
                     HAS_VALID, CAUSAL, PRECISION)  # fmt: skip
        v = tl.load(V + b * svb + hk * svh + offs_n[:, None] * svt + offs_e[None, :],
                    mask=(offs_n[:, None] < Tk) & (offs_e[None, :] < E), other=0.0)  # fmt: skip
        acc += tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    tl.store(OUT + b * sob + h * soh + offs_m[:, None] * sot + offs_e[None, :], acc.to(OUT.dtype.element_ty),
             mask=(offs_m[:, None] < Tq) & (offs_e[None, :] < E))  # fmt: skip


@triton.jit
def _bwd_dkdv(Q, K, V, BIAS, VALID, DO, DK, DV,
              sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sdob, sdot, sdoh, sdkb, sdkt, sdkh, sdvb, sdvt, sdvh,
              sbb, svab, H, G, Tq, Tk, D, E, scale, causal_offset,
              HAS_VALID: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr):  # fmt: skip
    pid_n, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // H, pid_bh % H
    hk = h // G
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d, offs_e = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_E)
    kt = tl.load(
        K + b * skb + hk * skh + offs_n[None, :] * skt + offs_d[:, None],
        mask=(offs_n[None, :] < Tk) & (offs_d[:, None] < D),
        other=0.0,
    )  # [BLOCK_D, BLOCK_N]
    v = tl.load(
        V + b * svb + hk * svh + offs_n[:, None] * svt + offs_e[None, :],
        mask=(offs_n[:, None] < Tk) & (offs_e[None, :] < E),
        other=0.0,
    )  # [BLOCK_N, BLOCK_E]
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_E], dtype=tl.float32)
    first = 0
    if CAUSAL:  # queries before this key block's first key never see it
        first = tl.maximum(0, pid_n * BLOCK_N - causal_offset) // BLOCK_M * BLOCK_M
    for start in range(first, Tq, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :],
                    mask=(offs_m[:, None] < Tq) & (offs_d[None, :] < D), other=0.0)  # fmt: skip
        bias = tl.load(BIAS + b * sbb + offs_m, mask=offs_m < Tq, other=0.0)
        p = _weights(q, kt, bias, offs_m, offs_n, VALID + b * svab, Tk, scale, causal_offset,
                     HAS_VALID, CAUSAL, PRECISION)  # fmt: skip
        do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdot + offs_e[None, :],
                     mask=(offs_m[:, None] < Tq) & (offs_e[None, :] < E), other=0.0)  # fmt: skip
        dv += tl.dot(tl.trans(p).to(do.dtype), do, input_precision=PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # [BLOCK_M, BLOCK_N]
        ds = dp * p * (1.0 - p) * scale
        dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PRECISION)
    tl.store(DK + b * sdkb + h * sdkh + offs_n[:, None] * sdkt + offs_d[None, :], dk.to(DK.dtype.element_ty),
             mask=(offs_n[:, None] < Tk) & (offs_d[None, :] < D))  # fmt: skip
    tl.store(DV + b * sdvb + h * sdvh + offs_n[:, None] * sdvt + offs_e[None, :], dv.to(DV.dtype.element_ty),
             mask=(offs_n[:, None] < Tk) & (offs_e[None, :] < E))  # fmt: skip


@triton.jit
def _bwd_dq(Q, K, V, BIAS, VALID, DO, DQ,
            sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sdob, sdot, sdoh, sdqb, sdqt, sdqh,
            sbb, svab, H, G, Tq, Tk, D, E, scale, causal_offset,
            HAS_VALID: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr):  # fmt: skip
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // H, pid_bh % H
    hk = h // G
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d, offs_e = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_E)
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :],
                mask=(offs_m[:, None] < Tq) & (offs_d[None, :] < D), other=0.0)  # fmt: skip
    bias = tl.load(BIAS + b * sbb + offs_m, mask=offs_m < Tq, other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdot + offs_e[None, :],
                 mask=(offs_m[:, None] < Tq) & (offs_e[None, :] < E), other=0.0)  # fmt: skip
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    end = Tk
    if CAUSAL:
        end = tl.minimum(Tk, (pid_m + 1) * BLOCK_M + causal_offset)
    for start in range(0, end, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        kt = tl.load(K + b * skb + hk * skh + offs_n[None, :] * skt + offs_d[:, None],
                     mask=(offs_n[None, :] < Tk) & (offs_d[:, None] < D), other=0.0)  # fmt: skip
        p = _weights(q, kt, bias, offs_m, offs_n, VALID + b * svab, Tk, scale, causal_offset,
                     HAS_VALID, CAUSAL, PRECISION)  # fmt: skip
        vt = tl.load(
            V + b * svb + hk * svh + offs_n[None, :] * svt + offs_e[:, None],
            mask=(offs_n[None, :] < Tk) & (offs_e[:, None] < E),
            other=0.0,
        )  # [BLOCK_E, BLOCK_N]
        dp = tl.dot(do, vt, input_precision=PRECISION)
        ds = dp * p * (1.0 - p) * scale
        dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=PRECISION)
    tl.store(DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqt + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=(offs_m[:, None] < Tq) & (offs_d[None, :] < D))  # fmt: skip


def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def _config(q: torch.Tensor, v: torch.Tensor, backward: bool = False) -> dict:
    d, e = q.shape[-1], v.shape[-1]
    # Tiles small enough to keep a program's accumulators in registers: head dims over 64, and the fp32
    # backward (two fp32 accumulators plus fp32 operands), spill at 64 (H100: fp32 backward 25x slower).
    block = 64 if max(d, e) <= 64 and not (backward and q.dtype == torch.float32) else 32
    precision = "ieee" if q.dtype == torch.float32 else "tf32"  # fp32 must match the fp32 reference
    return dict(BLOCK_M=block, BLOCK_N=block, BLOCK_D=_pow2(d), BLOCK_E=_pow2(e), PRECISION=precision)


class TritonSigmoidAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bias, valid, scale, causal_offset):
        """q [B,Tq,Hq,D], k [B,Tk,Hkv,D], v [B,Tk,Hkv,E] (last dim contiguous); bias [B,Tq] fp32;
        valid [B,Tk] uint8 or None; causal_offset None (noncausal) or int."""
        b, tq, h, d = q.shape
        tk, hk, e = k.shape[1], k.shape[2], v.shape[3]
        out = torch.empty(b, tq, h, e, dtype=q.dtype, device=q.device)
        cfg = _config(q, v)
        has_valid = valid is not None
        valid_arg = valid if has_valid else bias  # any pointer; never read
        grid = (triton.cdiv(tq, cfg["BLOCK_M"]), b * h)
        _fwd[grid](q, k, v, bias, valid_arg, out, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1),
                   k.stride(2), v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
                   bias.stride(0), valid_arg.stride(0), h, h // hk, tq, tk, d, e, scale, causal_offset or 0,
                   HAS_VALID=has_valid, CAUSAL=causal_offset is not None, **cfg)  # fmt: skip
        ctx.save_for_backward(q, k, v, bias, valid)
        ctx.scale, ctx.causal_offset = scale, causal_offset
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, bias, valid = ctx.saved_tensors
        b, tq, h, d = q.shape
        tk, hk, e = k.shape[1], k.shape[2], v.shape[3]
        g = h // hk
        dout = dout.contiguous()
        cfg = _config(q, v, backward=True)
        has_valid = valid is not None
        valid_arg = valid if has_valid else bias
        causal, off = ctx.causal_offset is not None, ctx.causal_offset or 0
        # per query head; summed over each kv head's group below
        dk = torch.empty(b, tk, h, d, dtype=torch.float32, device=q.device)
        dv = torch.empty(b, tk, h, e, dtype=torch.float32, device=q.device)
        dq = torch.empty_like(q)
        common = (bias.stride(0), valid_arg.stride(0), h, g, tq, tk, d, e, ctx.scale, off)
        strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0),
                   v.stride(1), v.stride(2), dout.stride(0), dout.stride(1), dout.stride(2))  # fmt: skip
        _bwd_dkdv[(triton.cdiv(tk, cfg["BLOCK_N"]), b * h)](
            q, k, v, bias, valid_arg, dout, dk, dv, *strides, dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0),
            dv.stride(1), dv.stride(2), *common, HAS_VALID=has_valid, CAUSAL=causal, **cfg)  # fmt: skip
        _bwd_dq[(triton.cdiv(tq, cfg["BLOCK_M"]), b * h)](
            q, k, v, bias, valid_arg, dout, dq, *strides, dq.stride(0), dq.stride(1), dq.stride(2), *common,
            HAS_VALID=has_valid, CAUSAL=causal, **cfg)  # fmt: skip
        dk = dk.view(b, tk, hk, g, d).sum(3).to(k.dtype)
        dv = dv.view(b, tk, hk, g, e).sum(3).to(v.dtype)
        return dq, dk, dv, None, None, None, None


def sigmoid_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor,
    *,
    scale: float,
    valid: torch.Tensor | None = None,
    causal_offset: int | None = None,
) -> torch.Tensor:
    """``[B,Tq,Hq,D], [B,Tk,Hkv,D], [B,Tk,Hkv,E] -> [B,Tq,Hq,E]``; ``bias [B|1, Tq]``, ``valid [B, Tk]`` bool."""
    b, tq = q.shape[:2]
    bias = bias.to(device=q.device, dtype=torch.float32).expand(b, tq).contiguous()
    valid_u8 = None if valid is None else valid.to(torch.uint8).contiguous()
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    return TritonSigmoidAttention.apply(q, k, v, bias, valid_u8, scale, causal_offset)
