"""rala: the reference against literal transcriptions of the formula (the authors' code for the noncausal
form, token loops for the causal forms) in fp64; chunk sizes, decoding state, large logits, the gate."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import attnkit
from attnkit.errors import AttnkitError, ShapeError
from attnkit.testing import assert_close, make_qkv

H, D = 4, 8


def phi(x):
    return F.elu(x) + 1.0


def build(**options):
    torch.manual_seed(0)
    return attnkit.create("rala", heads=H, head_dim=D, **options).double()


def gate(mech, q_i, h):
    return q_i @ mech.gate_weight[h] + mech.gate_bias[h]


def authors_form(mech, q, k, v, eps=1e-6):
    """GateLinearAttentionNoSilu of github.com/qhfan/RALA (without RoPE and LePE), head by head."""
    b, n, hq, d = q.shape
    out = torch.zeros(b, n, hq, v.shape[-1], dtype=torch.float64)
    for bi in range(b):
        for h in range(hq):
            kv_h = h // (hq // k.shape[2])
            qh, kh, vh = phi(q[bi, :, h]), phi(k[bi, :, kv_h]), v[bi, :, kv_h]  # [N, D]
            q_mean = qh.mean(0, keepdim=True)  # [1, D]
            eff = torch.softmax(q_mean @ kh.T / math.sqrt(d), dim=-1).T  # [N, 1]
            kk = kh * eff * n
            z = 1 / (qh @ kk.mean(0, keepdim=True).T + eps)  # [N, 1]
            kv = (kk.T * n**-0.5) @ (vh * n**-0.5)  # [D, Dv]
            out[bi, :, h] = (qh @ kv * z) * gate(mech, q[bi, :, h], h)
    return out


def causal_loops(mech, q, k, v, cross, eps=1e-6):
    """Token by token. causal_self: key t weighted by exp(scale qbar_t . phi(k_t)) with qbar_t the mean of
    phi(q_1..t); query i normalises over keys 1..i. causal_cross: query i's own softmax over every key,
    with qbar_i the mean of phi(q_1..i)."""
    b, tq, hq, d = q.shape
    tk, scale = k.shape[1], 1 / math.sqrt(d)
    out = torch.zeros(b, tq, hq, v.shape[-1], dtype=torch.float64)
    for bi in range(b):
        for h in range(hq):
            kv_h = h // (hq // k.shape[2])
            q_sum = torch.zeros(d, dtype=torch.float64)
            S, z, Z = torch.zeros(d, v.shape[-1], dtype=torch.float64), torch.zeros(d, dtype=torch.float64), 0.0
            for i in range(tq):
                fq = phi(q[bi, i, h])
                q_sum = q_sum + fq
                qbar = q_sum / (i + 1)
                if cross:
                    w = [math.exp(scale * float(qbar @ phi(k[bi, j, kv_h]))) for j in range(tk)]
                    alpha = [wj / sum(w) for wj in w]
                    num = sum(a * float(fq @ phi(k[bi, j, kv_h])) * v[bi, j, kv_h] for j, a in enumerate(alpha))
                    den = sum(a * float(fq @ phi(k[bi, j, kv_h])) for j, a in enumerate(alpha))
                else:
                    fk = phi(k[bi, i, kv_h])
                    w = math.exp(scale * float(qbar @ fk))
                    S, z, Z = S + w * torch.outer(fk, v[bi, i, kv_h]), z + w * fk, Z + w
                    num, den = fq @ S / Z, float(fq @ z) / Z
                out[bi, i, h] = num / (den + eps) * gate(mech, q[bi, i, h], h)
    return out


def cross_loops(mech, q, k, v, eps=1e-6):
    """noncausal_cross: one qbar over all queries, one softmax over the keys."""
    b, tq, hq, d = q.shape
    out = torch.zeros(b, tq, hq, v.shape[-1], dtype=torch.float64)
    for bi in range(b):
        for h in range(hq):
            kv_h = h // (hq // k.shape[2])
            fk = phi(k[bi, :, kv_h])
            alpha = torch.softmax(phi(q[bi, :, h]).mean(0) @ fk.T / math.sqrt(d), 0)  # [Tk]
            S = torch.einsum("j,jd,je->de", alpha, fk, v[bi, :, kv_h])
            z = alpha @ fk
            for i in range(tq):
                fq = phi(q[bi, i, h])
                out[bi, i, h] = fq @ S / (fq @ z + eps) * gate(mech, q[bi, i, h], h)
    return out


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_noncausal_self_is_the_authors_code(kv_heads):
    mech = build()
    q, k, v = make_qkv(2, 11, 11, H, kv_heads, D, dtype=torch.float64)
    want = authors_form(mech, q, k, v)
    for path in ("reference", "associative"):
        assert_close(path, want, mech(q, k, v, pattern="noncausal_self", path=path), 1e-10)


def test_noncausal_cross_formula():
    mech = build()
    q, k, v = make_qkv(2, 6, 13, H, 2, D, dtype=torch.float64)
    want = cross_loops(mech, q, k, v)
    for path in ("reference", "associative"):
        assert_close(path, want, mech(q, k, v, pattern="noncausal_cross", path=path), 1e-10)


def test_causal_cross_is_each_querys_own_softmax():
    q, k, v = make_qkv(2, 9, 13, H, 2, D, dtype=torch.float64)
    mech = build(block_size=4)
    want = causal_loops(mech, q, k, v, cross=True)
    for path in ("reference", "blocked"):
        assert_close(path, want, mech(q, k, v, pattern="causal_cross", path=path), 1e-10)


@pytest.mark.parametrize("chunk_size", [1, 3, 64])
def test_causal_self_is_the_running_form(chunk_size):
    q, k, v = make_qkv(2, 14, 14, H, 2, D, dtype=torch.float64)
    mech = build(chunk_size=chunk_size)
    want = causal_loops(mech, q, k, v, cross=False)
    for path in ("reference", "chunk", "recurrent"):
        assert_close(path, want, mech(q, k, v, pattern="causal_self", path=path), 1e-10)
    # decoding token by token from the state
    state, outs = None, []
    for i in range(14):
        o, state = mech(q[:, i : i + 1], k[:, i : i + 1], v[:, i : i + 1], pattern="causal_self",
                        state=state, return_state=True)  # fmt: skip
        outs.append(o)
    assert_close("decoded", want, torch.cat(outs, 1), 1e-10)


def test_large_logits_do_not_overflow():
    """Logits well above exp's fp32 range (88): the running reference logit keeps every weight <= 1."""
    q, k, v = make_qkv(1, 300, 300, H, H, 64)
    q, k = q.abs() * 6, k.abs() * 6
    torch.manual_seed(0)
    mech = attnkit.create("rala", heads=H, head_dim=64)
    qbar = phi(q.double()).cumsum(1) / torch.arange(1, 301, dtype=torch.float64)[:, None, None]
    assert (qbar * phi(k.double())).sum(-1).max() / 8 > 200  # the largest logit, scale = 1/8
    want = mech.double()(q.double(), k.double(), v.double(), pattern="causal_self", path="reference")
    mech.float()
    for pattern, path in (("causal_self", "chunk"), ("causal_self", "reference"), ("noncausal_self", "associative")):
        got = mech(q, k, v, pattern=pattern, path=path)
        assert torch.isfinite(got).all(), f"{pattern} {path}"
        if pattern == "causal_self":
            assert_close(path, want, got, 1e-4)  # logits ~200 carry fp32 rounding of ~1e-5 relative


def test_gate_is_a_learned_parameter():
    q, k, v = make_qkv(1, 5, 5, H, H, D)
    with pytest.raises(AttnkitError, match="create"):
        attnkit.attend(q, k, v, "rala", pattern="causal_self")
    with pytest.raises(AttnkitError, match="heads"):
        attnkit.create("rala")
    mech = attnkit.create("rala", heads=H, head_dim=D)
    mech(q, k, v, pattern="causal_self").square().sum().backward()
    assert mech.gate_weight.grad.abs().sum() > 0 and mech.gate_bias.grad.abs().sum() > 0
    with pytest.raises(ShapeError, match="head_dim=8"):
        mech(q, k, torch.cat([v, v], -1), pattern="noncausal_self")


def test_state_is_constant_size_and_per_query_head():
    mech = attnkit.create("rala", heads=H, head_dim=D)
    sizes = []
    for t in (3, 30, 300):
        q, k, v = make_qkv(1, t, t, H, 1, D)
        _, st = mech(q, k, v, pattern="causal_self", return_state=True)
        assert st.S.shape == (1, H, D, D)  # alpha depends on the query head's mean: one buffer per query head
        sizes.append(st.nbytes)
    assert len(set(sizes)) == 1


def test_in_an_attention_layer():
    torch.manual_seed(0)
    layer = attnkit.Attention(dim=32, heads=4, kv_heads=2, mechanism="rala", pattern="causal_self")
    x = torch.randn(2, 10, 32)
    y = layer(x)
    assert y.shape == x.shape and torch.isfinite(y).all()


def test_rescaling_scan_equals_shared_reference_sums(monkeypatch):
    """Logits spanning more than SAFE_SPAN take the log-depth scan; force it on ordinary inputs: same result."""
    from attnkit.mechanisms import rala

    q, k, v = make_qkv(2, 40, 40, H, 2, D, dtype=torch.float64)
    kpm = torch.rand(2, 40, generator=torch.Generator().manual_seed(1)) > 0.3
    mech = build(chunk_size=4)
    shared, st1 = mech(q, k, v, pattern="causal_self", key_padding_mask=kpm, path="chunk", return_state=True)
    monkeypatch.setattr(rala, "SAFE_SPAN", {torch.float32: -1.0, torch.float64: -1.0})
    scanned, st2 = mech(q, k, v, pattern="causal_self", key_padding_mask=kpm, path="chunk", return_state=True)
    assert_close("scan", shared, scanned, 1e-12)
    for name, t in st1.tensors().items():
        assert_close(f"state.{name}", t, st2.tensors()[name], 1e-12)
