"""aaren: the prefix softmax of a learned query, its scan and RNN forms, and the O(1) state."""

from __future__ import annotations

import math

import pytest
import torch

import attnkit
from attnkit.testing import assert_close, make_qkv


def build(heads=4, head_dim=8, **options):
    torch.manual_seed(0)
    return attnkit.create("aaren", heads=heads, head_dim=head_dim, **options).double()


def literal(query, k, v, mask=None):
    """o_t = sum_{j<=t, real} exp(s_j) v_j / sum_{j<=t, real} exp(s_j), s_j = query . k_j / sqrt(D); 0 if none.

    Plain loops over batch, head and position, with Python floats for the softmax weights.
    """
    b, t, hq, d = k.shape[0], k.shape[1], query.shape[0], k.shape[-1]
    g = hq // k.shape[2]
    out = torch.zeros(b, t, hq, v.shape[-1], dtype=torch.float64)
    for bi in range(b):
        for h in range(hq):
            s = [float(query[h] @ k[bi, j, h // g]) / math.sqrt(d) for j in range(t)]
            for i in range(t):
                seen = [j for j in range(i + 1) if mask is None or bool(mask[bi, j])]
                if not seen:
                    continue
                top = max(s[j] for j in seen)
                weights = {j: math.exp(s[j] - top) for j in seen}
                total = sum(weights.values())
                out[bi, i, h] = sum(wj / total * v[bi, j, h // g] for j, wj in weights.items())
    return out


@pytest.mark.parametrize("padded", [False, True], ids=["dense", "padded"])
def test_every_path_equals_the_explicit_prefix_softmax(padded):
    mech = build(chunk_size=4)
    q, k, v = make_qkv(2, 13, 13, 4, 2, 8, dtype=torch.float64)
    mask = None
    if padded:
        mask = torch.rand(2, 13, generator=torch.Generator().manual_seed(1)) > 0.4
        mask[0, :3] = False  # row 0 starts with padding: its first outputs are 0
    want = literal(mech.query.detach(), k, v, mask)
    for path in ("reference", "scan", "recurrent"):
        out = mech(q, k, v, pattern="causal_self", key_padding_mask=mask, path=path)
        assert_close(path, want, out, 1e-12)
    if padded:
        assert mech(q, k, v, pattern="causal_self", key_padding_mask=mask)[0, :3].abs().max() == 0


@pytest.mark.parametrize("chunk_size", [1, 3, 8, 64])
def test_scan_equals_recurrent_outputs_states_and_gradients(chunk_size):
    mech = build(chunk_size=chunk_size)
    q, k, v = make_qkv(2, 37, 37, 4, 4, 8, dtype=torch.float64, requires_grad=True)
    results = {}
    for path in ("scan", "recurrent"):
        out, st = mech(q, k, v, pattern="causal_self", path=path, return_state=True)
        grads = torch.autograd.grad((out * out.detach().cos()).sum(), (k, v, mech.query))
        results[path] = (out, st, grads)
    (o1, s1, g1), (o2, s2, g2) = results["scan"], results["recurrent"]
    assert_close("out", o2, o1, 1e-12)
    for name in ("m", "u", "w"):
        assert_close(name, getattr(s2, name), getattr(s1, name), 1e-12)
    for name, a, b in zip(("dk", "dv", "dquery"), g2, g1, strict=True):
        assert_close(name, a, b, 1e-10)


def test_state_is_the_running_max_denominator_and_numerator():
    mech = build()
    q, k, v = make_qkv(1, 20, 20, 4, 4, 8, dtype=torch.float64)
    _, st = mech(q, k, v, pattern="causal_self", return_state=True)
    s = torch.einsum("hd,bthd->bht", mech.query.detach(), k) / math.sqrt(8)  # [B, H, T]
    m = s.amax(-1)
    e = torch.exp(s - m[..., None])
    assert_close("m", m, st.m, 1e-12)
    assert_close("u", e.sum(-1), st.u, 1e-12)
    assert_close("w", torch.einsum("bht,bthd->bhd", e, v), st.w, 1e-12)
    assert st.offset == 20


def test_decoding_token_by_token_equals_one_call_and_the_state_stays_constant():
    mech = build()
    q, k, v = make_qkv(2, 30, 30, 4, 2, 8, dtype=torch.float64)
    full = mech(q, k, v, pattern="causal_self", path="scan")
    state, outs, sizes = None, [], set()
    for i in range(30):
        o, state = mech(q[:, i : i + 1], k[:, i : i + 1], v[:, i : i + 1], pattern="causal_self",
                        state=state, return_state=True)  # fmt: skip
        assert mech.last_path == "recurrent"
        outs.append(o)
        sizes.add(state.nbytes)
    assert_close("decoded", full, torch.cat(outs, 1), 1e-12)
    assert sizes == {2 * 4 * (2 + 8) * 8}  # batch * heads * (m, u, w[Dv]) * fp64 bytes, for every length


def test_huge_scores_do_not_overflow():
    """The running max keeps every exponent <= 0: scores of several thousand stay finite in fp32."""
    mech = build(head_dim=16).float()
    q, k, v = make_qkv(1, 70, 70, 4, 4, 16)
    k = k * 1000.0  # scores ~ +-4000: exp() of them overflows fp32 without the shift
    want = literal(mech.query.detach().double(), k.double(), v.double())
    for path in ("reference", "scan", "recurrent"):
        assert_close(path, want, mech(q, k, v, pattern="causal_self", path=path), 1e-5)


def test_output_ignores_q_and_q_gets_a_zero_gradient():
    mech = build()
    q, k, v = make_qkv(1, 9, 9, 4, 4, 8, dtype=torch.float64, requires_grad=True)
    for path in ("reference", "scan", "recurrent"):
        out = mech(q, k, v, pattern="causal_self", path=path)
        other = mech(torch.randn_like(q), k, v, pattern="causal_self", path=path)
        assert torch.equal(out, other)
        (dq,) = torch.autograd.grad(out.sum(), (q,))
        assert dq.abs().max() == 0


def test_learned_query_is_deterministic_and_sized_by_heads():
    a, b = build(), build()
    assert a.query.shape == (4, 8) and torch.equal(a.query, b.query)
    with pytest.raises(attnkit.InvalidOption, match="heads"):
        attnkit.create("aaren")
    q, k, v = make_qkv(1, 5, 5, 2, 2, 8)
    with pytest.raises(attnkit.ShapeError, match="4 heads"):
        build().float()(q, k, v, pattern="causal_self")


@pytest.mark.parametrize("pattern", ["noncausal_self", "noncausal_cross", "causal_cross"])
def test_only_causal_self(pattern):
    q, k, v = make_qkv(1, 5, 5, 4, 4, 8)
    with pytest.raises(attnkit.UnsupportedPattern, match="causal_self"):
        build().float()(q, k, v, pattern=pattern)
