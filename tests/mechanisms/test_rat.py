"""rat: recurrence inside chunks, softmax across chunk summaries, against a literal loop; the chunk cache."""

from __future__ import annotations

import math

import pytest
import torch

import attnkit
from attnkit.testing import assert_close, make_qkv


def build(chunk_size, heads=4, head_dim=8):
    torch.manual_seed(0)
    return attnkit.create("rat", heads=heads, head_dim=head_dim, chunk_size=chunk_size).double()


def literal(mech, q, k, v, mask=None, causal=True):
    """The paper's equations with plain loops: chunks of L real tokens, the gated RNN inside each chunk,
    then for each query a softmax over the final (k~, v~) of the earlier chunks and its own partial one
    (noncausal: the final summary of every chunk)."""
    b, t, hq, d = q.shape
    g_kv = hq // k.shape[2]
    L, w, bias = mech.options.chunk_size, mech.gate_weight.detach(), mech.gate_bias.detach()
    out = torch.zeros(b, t, hq, d, dtype=torch.float64)
    for bi in range(b):
        real = [j for j in range(t) if mask is None or bool(mask[bi, j])]
        for h in range(hq):
            chunks, state = [], None  # chunks: list of lists of (token, k~, v~)
            for n, j in enumerate(real):
                kj, vj = k[bi, j, h // g_kv], v[bi, j, h // g_kv]
                gate = torch.sigmoid(torch.cat([kj, vj]) @ w[h] + bias[h])
                if n % L == 0:
                    chunks.append([])
                    state = ((1 - gate) * kj, (1 - gate) * vj)
                else:
                    state = (gate * state[0] + (1 - gate) * kj, gate * state[1] + (1 - gate) * vj)
                chunks[-1].append((j, *state))
            for i in range(t):
                if causal:
                    done = [c[-1] for c in chunks if len(c) == L and c[-1][0] < i]
                    mine = [c for c in chunks if c[0][0] <= i and not (len(c) == L and c[-1][0] < i)]
                    own = [e for e in mine[0] if e[0] <= i][-1:] if mine else []
                    entries = done + own
                else:
                    entries = [c[-1] for c in chunks]
                if not entries:
                    continue
                logits = [float(q[bi, i, h] @ e[1]) / math.sqrt(d) for e in entries]
                top = max(logits)
                weights = [math.exp(s - top) for s in logits]
                out[bi, i, h] = sum(wj / sum(weights) * e[2] for wj, e in zip(weights, entries, strict=True))
    return out


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("padded", [False, True], ids=["dense", "padded"])
@pytest.mark.parametrize("chunk_size", [1, 4, 50])
def test_every_path_equals_the_literal_loop(chunk_size, padded, causal):
    mech = build(chunk_size)
    q, k, v = make_qkv(2, 19, 19, 4, 2, 8, dtype=torch.float64)
    mask = None
    if padded:
        mask = torch.rand(2, 19, generator=torch.Generator().manual_seed(5)) > 0.35
        mask[0, :3] = False
        mask[1, -4:] = False
    want = literal(mech, q, k, v, mask, causal)
    pattern = "causal_self" if causal else "noncausal_self"
    for path in ("reference", "chunk", "recurrent") if causal else ("reference", "chunk"):
        assert_close(path, want, mech(q, k, v, pattern=pattern, key_padding_mask=mask, path=path), 1e-12)


@pytest.mark.parametrize("sizes", [[1] * 23, [5, 1, 7, 2, 3, 1, 4], [23], [3, 3, 3, 3, 3, 3, 5]], ids=str)
@pytest.mark.parametrize("padded", [False, True], ids=["dense", "padded"])
def test_chunked_calls_cutting_through_rat_chunks_equal_one_call(sizes, padded):
    mech = build(4)
    q, k, v = make_qkv(2, 23, 23, 4, 2, 8, dtype=torch.float64)
    mask = None
    if padded:
        mask = torch.rand(2, 23, generator=torch.Generator().manual_seed(9)) > 0.3
    for path in ("reference", "chunk", "recurrent"):
        full, full_state = mech(q, k, v, pattern="causal_self", key_padding_mask=mask, path=path, return_state=True)
        state, outs, start = None, [], 0
        for n in sizes:
            sl = slice(start, start + n)
            o, state = mech(q[:, sl], k[:, sl], v[:, sl], pattern="causal_self", path=path, state=state,
                            key_padding_mask=None if mask is None else mask[:, sl], return_state=True)  # fmt: skip
            outs.append(o)
            start += n
        assert_close(path, full, torch.cat(outs, 1), 1e-12)
        for name in ("chunks", "h", "seen"):
            assert_close(f"{path} state.{name}", getattr(full_state, name), getattr(state, name), 1e-12)


@pytest.mark.parametrize("path", ["chunk", "recurrent"])
def test_the_chunk_cache_grows_by_one_every_chunk(path):
    mech = build(4).float()
    q, k, v = make_qkv(1, 20, 20, 4, 2, 8)
    state, counts = None, []
    for i in range(20):
        _, state = mech(q[:, i : i + 1], k[:, i : i + 1], v[:, i : i + 1], pattern="causal_self",
                        state=state, return_state=True, path=path)  # fmt: skip
        counts.append(state.chunks.shape[1])
        shape = attnkit.mechanism.Shape(1, i + 1, i + 1, 4, 2, 8, 8)
        assert state.nbytes == mech.state_bytes(shape)
    assert counts == [(i + 1) // 4 for i in range(20)]


def gated(mech, k, v):
    """(1 - g) k and (1 - g) v per head, g = sigmoid([k; v] W + b): what one token alone leaves in the RNN."""
    w, bias = mech.gate_weight.detach(), mech.gate_bias.detach()
    g = torch.sigmoid(torch.einsum("bthe,hed->bthd", torch.cat([k, v], -1), w) + bias)
    return (1 - g) * k, (1 - g) * v


def test_chunk_size_one_is_softmax_attention_over_gated_keys_and_values():
    mech = build(1)
    q, k, v = make_qkv(2, 17, 17, 4, 4, 8, dtype=torch.float64)
    kg, vg = gated(mech, k, v)
    want = attnkit.attend(q, kg, vg, pattern="causal_self", path="reference")
    assert_close("L=1", want, mech(q, k, v, pattern="causal_self"), 1e-12)


def test_one_chunk_is_a_pure_rnn():
    """With L >= T every query sees only its own partial summary: the output is v~_t, whatever q is."""
    mech = build(64)
    q, k, v = make_qkv(1, 12, 12, 4, 4, 8, dtype=torch.float64)
    w, bias = mech.gate_weight.detach(), mech.gate_bias.detach()
    g = torch.sigmoid(torch.einsum("bthe,hed->bthd", torch.cat([k, v], -1), w) + bias)
    h, want = torch.zeros_like(v[:, 0]), []
    for t in range(12):
        h = g[:, t] * h + (1 - g[:, t]) * v[:, t]
        want.append(h)
    out = mech(q, k, v, pattern="causal_self")
    assert_close("rnn", torch.stack(want, 1), out, 1e-12)
    assert_close("q-free", out, mech(torch.randn_like(q), k, v, pattern="causal_self"), 1e-12)


def test_gradients_of_the_gate_parameters_match_the_reference():
    mech = build(3)
    q, k, v = make_qkv(2, 29, 29, 4, 2, 8, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(2, 29, generator=torch.Generator().manual_seed(2)) > 0.2
    runs = [("causal_self", p) for p in ("chunk", "recurrent")] + [("noncausal_self", "chunk")]
    for pattern, path in runs:
        grads = []
        for which in ("reference", path):
            out = mech(q, k, v, pattern=pattern, key_padding_mask=mask, path=which)
            grads.append(torch.autograd.grad(out.sin().sum(), (mech.gate_weight, mech.gate_bias, q, k)))
        for name, a, b in zip(("dW", "db", "dq", "dk"), *grads, strict=True):
            assert_close(f"{pattern} {path} {name}", a, b, 1e-10)


def test_gate_bias_starts_as_in_the_authors_code_and_dims_are_checked():
    mech = build(16)
    g = torch.sigmoid(mech.gate_bias.detach())
    assert (g >= 0.5).all() and (g <= 15 / 16).all()  # b = log U(1, L - 1)
    q, k, v = make_qkv(1, 5, 5, 4, 4, 8)
    with pytest.raises(attnkit.ShapeError, match="head_dim 8"):
        mech.float()(q, k, v[..., :4], pattern="causal_self")
    with pytest.raises(attnkit.UnsupportedPattern, match="causal_self"):
        mech.float()(q, k, v, pattern="noncausal_cross")
