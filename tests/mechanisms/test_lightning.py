"""lightning: Lightning Attention-2's block algorithm and the plain decayed sum, written out in fp64; the
ALiBi / TransNormerLLM decay schedule; activation, block size and the options."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import attnkit
from attnkit.errors import InvalidOption
from attnkit.testing import assert_close, make_qkv


def decayed_sum(q, k, v, lam, causal):
    """o_t = sum_s lambda^|t-s| (q_t . k_s) v_s over s <= t (causal) or all s, per head, with loops."""
    b, t, h, _ = q.shape
    out = torch.zeros(b, t, h, v.shape[-1], dtype=torch.float64)
    for head in range(h):
        for i in range(t):
            for j in range(i + 1 if causal else t):
                out[:, i, head] += (lam[head] ** abs(i - j) * (q[:, i, head] * k[:, j, head]).sum(-1))[:, None] * v[
                    :, j, head
                ]
    return out


def lightning2_blocks(q, k, v, lam, block):
    """Algorithm 1 of Lightning Attention-2, one head at a time: intra-block masked matmul, inter-block state."""
    b, t, h, d = q.shape
    out = torch.zeros(b, t, h, v.shape[-1], dtype=torch.float64)
    for head in range(h):
        lm = lam[head]
        kv = torch.zeros(b, d, v.shape[-1], dtype=torch.float64)
        for start in range(0, t, block):
            qi, ki, vi = (x[:, start : start + block, head] for x in (q, k, v))  # [B, b, D]
            n = qi.shape[1]
            idx = torch.arange(n, dtype=torch.float64)
            M = torch.where(idx[:, None] >= idx[None, :], lm ** (idx[:, None] - idx[None, :]), 0.0)  # [b, b]
            intra = ((qi @ ki.transpose(1, 2)) * M) @ vi
            inter = (lm ** (idx + 1))[None, :, None] * (qi @ kv)  # Lambda Q_i KV
            out[:, start : start + n, head] = intra + inter
            kv = lm**n * kv + (lm ** (n - 1 - idx)[None, :, None] * ki).transpose(1, 2) @ vi
    return out


def slopes_lambda(slopes, layer=0, layers=1):
    factor = 1 - layer / (layers - 1) + 1e-5 if layers > 1 else 1 + 1e-5
    return [math.exp(-s * factor) for s in slopes]


ALIBI_4 = [2**-2, 2**-4, 2**-6, 2**-8]


@pytest.mark.parametrize("block", [1, 4, 16])
def test_reference_and_chunk_equal_lightning_attention_2(block):
    q, k, v = make_qkv(2, 19, 19, 4, 4, 8, dtype=torch.float64)
    lam = slopes_lambda(ALIBI_4)
    phi_q, phi_k = F.silu(q), F.silu(k)  # TransNormerLLM's activation
    expected = lightning2_blocks(phi_q, phi_k, v, lam, block)
    assert_close("blocks vs sum", decayed_sum(phi_q, phi_k, v, lam, causal=True), expected, 1e-12)
    for path in ("reference", "chunk", "recurrent"):
        out = attnkit.attend(q, k, v, "lightning", pattern="causal_self", path=path, block_size=block)
        assert_close(path, expected, out, 1e-10)


def test_noncausal_uses_the_symmetric_decay():
    q, k, v = make_qkv(1, 11, 11, 2, 2, 8, dtype=torch.float64)
    slopes = (0.3, 0.05)
    expected = decayed_sum(q, k, v, slopes_lambda(slopes), causal=False)
    for path in ("reference", "bidirectional"):
        out = attnkit.attend(
            q, k, v, "lightning", pattern="noncausal_self", path=path, activation="identity", slopes=slopes
        )
        assert_close(path, expected, out, 1e-10)


def test_one_slope_serves_every_head():
    q, k, v = make_qkv(1, 12, 12, 4, 2, 8, dtype=torch.float64)
    out = attnkit.attend(q, k, v, "lightning", pattern="causal_self", activation="identity", slopes=(0.2,))
    kv = (k.repeat_interleave(2, 2), v.repeat_interleave(2, 2))
    assert_close("broadcast", decayed_sum(q, *kv, slopes_lambda([0.2] * 4), causal=True), out, 1e-10)


def test_alibi_slopes():
    from attnkit.ops.decay import alibi_slopes

    assert alibi_slopes(8) == [2.0 ** -(i + 1) for i in range(8)]
    assert alibi_slopes(4) == ALIBI_4
    # 6 heads: the 4-head slopes, then every other slope of 8 heads
    assert alibi_slopes(6) == ALIBI_4 + [2**-1, 2**-3]


def test_layer_factor_scales_the_slopes():
    mech = attnkit.create("lightning", layer=3, layers=5)
    lam = torch.exp(mech.head_log_decays(4))
    expected = torch.tensor(slopes_lambda(ALIBI_4, layer=3, layers=5), dtype=torch.float64)
    assert torch.allclose(lam, expected, rtol=1e-14)
    last = attnkit.create("lightning", layer=4, layers=5)  # the last layer keeps a tiny decay (1e-5)
    assert (torch.exp(last.head_log_decays(4)) < 1).all()


def test_activation_no_scale_and_block_size():
    q, k, v = make_qkv(1, 70, 70, 2, 1, 16)
    silu = attnkit.attend(q, k, v, "lightning", pattern="causal_self")
    ident = attnkit.attend(q, k, v, "lightning", pattern="causal_self", activation="identity")
    assert (silu - ident).abs().max() > 1e-2
    for block in (1, 7, 64, 500):
        out = attnkit.attend(q, k, v, "lightning", pattern="causal_self", path="chunk", block_size=block)
        assert_close(f"block {block}", silu, out, 1e-5)
    with pytest.raises(InvalidOption, match="does not use a score scale"):
        attnkit.attend(q, k, v, "lightning", pattern="causal_self", scale=0.5)


def test_bad_options_raise():
    q, k, v = make_qkv(1, 5, 5, 4, 2, 8)
    with pytest.raises(InvalidOption, match="2 values but q has 4 heads"):
        attnkit.attend(q, k, v, "lightning", pattern="causal_self", slopes=(0.1, 0.2))
    for bad in ({"slopes": (-0.1,)}, {"layer": 2, "layers": 2}, {"activation": "gelu"}, {"block_size": 0}):
        with pytest.raises(InvalidOption):
            attnkit.create("lightning", **bad)


def test_state_is_per_query_head_and_constant():
    q, k, v = make_qkv(1, 30, 30, 4, 1, 8)
    full = attnkit.attend(q, k, v, "lightning", pattern="causal_self")
    o1, st = attnkit.attend(q[:, :29], k[:, :29], v[:, :29], "lightning", pattern="causal_self", return_state=True)
    o2, st2 = attnkit.attend(
        q[:, 29:], k[:, 29:], v[:, 29:], "lightning", pattern="causal_self", state=st, return_state=True
    )
    assert_close("decode", full, torch.cat([o1, o2], 1), 1e-5)
    assert st.S.shape == st2.S.shape == (1, 4, 8, 8) and st.nbytes == st2.nbytes
