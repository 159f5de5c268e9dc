"""agent: the paper's formula written out (pooling, gather, broadcast, DWC as a conv1d), the leak-free causal
definition (block structure, future tokens change nothing, a big block is causal softmax), causal_cross's
agents from the context, decoding state, option checks, and linear memory of the fast path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from largest_tensor import largest_tensor

import attnkit
from attnkit.errors import InvalidOption
from attnkit.testing import assert_close, make_qkv


def pooled(x, n):
    """Adaptive average pooling over tokens by hand: segment s holds ranks r with floor(r n / T) == s."""
    t = x.shape[1]
    groups = [[r for r in range(t) if r * n // t == s] for s in range(n)]
    return torch.stack([x[:, g].mean(1) for g in groups if g], dim=1)  # [B, n', H, D]


def conv_dwc(v, w, causal):
    """The DWC with torch's conv1d: v [B, T, H, D], w [H, D, K]."""
    b, t, h, d = v.shape
    kern = w.shape[-1]
    pad = (kern - 1, 0) if causal else (kern // 2, kern // 2)
    x = F.pad(v.reshape(b, t, h * d).transpose(1, 2), pad)
    return F.conv1d(x, w.reshape(h * d, 1, kern), groups=h * d).transpose(1, 2).reshape(b, t, h, d)


def literal_noncausal(q, k, v, n, w, scale):
    a = pooled(q, n)  # [B, n, H, D]
    va = torch.softmax(scale * torch.einsum("bnhd,bkhd->bhnk", a, k), -1) @ v.transpose(1, 2)  # [B, H, n, D]
    out = torch.softmax(scale * torch.einsum("bqhd,bnhd->bhqn", q, a), -1) @ va
    return out.transpose(1, 2) + conv_dwc(v, w, causal=False)


@pytest.mark.parametrize("path", ["reference", "sdpa"])
@pytest.mark.parametrize("n", [4, 7, 25])  # divides T, ragged, more agents than tokens
def test_noncausal_self_is_the_papers_formula(path, n):
    mech = attnkit.create("agent", heads=2, head_dim=8, num_agents=n, kernel_size=5).double()
    q, k, v = make_qkv(2, 20, 20, 2, 2, 8, dtype=torch.float64)
    want = literal_noncausal(q, k, v, n, mech.dwc.detach(), 8**-0.5)
    assert_close(path, want, mech(q, k, v, pattern="noncausal_self", path=path), 1e-9)


@pytest.mark.parametrize("path", ["reference", "sdpa"])
def test_causal_with_one_block_is_causal_softmax_plus_a_causal_conv(path):
    # block_size >= T: no block completes, so no agent: exact causal attention over the own block
    mech = attnkit.create("agent", heads=2, head_dim=8, block_size=64, kernel_size=3).double()
    q, k, v = make_qkv(1, 30, 30, 2, 2, 8, dtype=torch.float64)
    want = attnkit.attend(q, k, v, "softmax", pattern="causal_self") + conv_dwc(v, mech.dwc.detach(), causal=True)
    assert_close(path, want, mech(q, k, v, pattern="causal_self", path=path), 1e-9)


def causal_literal(q, k, v, bs, scale):
    """Query i: one softmax over the agents of completed blocks c < i // bs (agent c: mean of q over block c,
    gathering from keys <= its block's end) and the keys of its own block up to i. A loop per query."""
    b, t, h, d = q.shape
    out = torch.zeros_like(v)
    for i in range(t):
        c_i = i // bs
        keys, vals = [], []
        for c in range(c_i):
            a = q[:, c * bs : (c + 1) * bs].mean(1)  # [B, H, D]
            kk, vv = k[:, : (c + 1) * bs], v[:, : (c + 1) * bs]
            p = torch.softmax(scale * torch.einsum("bhd,bkhd->bhk", a, kk), -1)
            keys.append(a)
            vals.append(torch.einsum("bhk,bkhd->bhd", p, vv))
        for j in range(c_i * bs, i + 1):
            keys.append(k[:, j])
            vals.append(v[:, j])
        kk, vv = torch.stack(keys, 1), torch.stack(vals, 1)  # [B, n, H, D]
        p = torch.softmax(scale * torch.einsum("bhd,bnhd->bhn", q[:, i], kk), -1)
        out[:, i] = torch.einsum("bhn,bnhd->bhd", p, vv)
    return out


@pytest.mark.parametrize("path", ["reference", "sdpa"])
def test_causal_self_equals_the_loop_over_queries(path):
    mech = attnkit.create("agent", heads=2, head_dim=8, block_size=4).double()
    with torch.no_grad():
        mech.dwc.zero_()
    q, k, v = make_qkv(2, 19, 19, 2, 2, 8, dtype=torch.float64)
    assert_close(path, causal_literal(q, k, v, 4, 8**-0.5), mech(q, k, v, pattern="causal_self", path=path), 1e-9)


@pytest.mark.parametrize("path", ["reference", "sdpa"])
def test_future_tokens_change_no_causal_output(path):
    # agents are means of *queries*: changing only later queries must not move earlier outputs either
    mech = attnkit.create("agent", heads=2, head_dim=8, block_size=4, kernel_size=5)
    q, k, v = make_qkv(2, 40, 40, 2, 2, 8)
    out = mech(q, k, v, pattern="causal_self", path=path)
    for cut in (1, 4, 13, 21):
        for which in ("q", "k", "v", "all"):
            q2, k2, v2 = q.clone(), k.clone(), v.clone()
            for name, t in (("q", q2), ("k", k2), ("v", v2)):
                if which in (name, "all"):
                    t[:, cut:] = torch.randn_like(t[:, cut:]) * 3
            moved = mech(q2, k2, v2, pattern="causal_self", path=path)
            assert torch.equal(out[:, :cut], moved[:, :cut]) or torch.allclose(out[:, :cut], moved[:, :cut],
                                                                                 atol=1e-6), (cut, which)  # fmt: skip


@pytest.mark.parametrize("path", ["reference", "sdpa"])
def test_causal_cross_agents_come_from_the_context(path):
    mech = attnkit.create("agent", heads=2, head_dim=8, num_agents=4)
    q, k, v = make_qkv(1, 9, 12, 2, 2, 8)
    out = mech(q, k, v, pattern="causal_cross", path=path)
    q2 = q.clone()
    q2[:, 1:] = torch.randn_like(q2[:, 1:])  # other queries change: query 0's output does not
    assert torch.allclose(out[:, 0], mech(q2, k, v, pattern="causal_cross", path=path)[:, 0], atol=1e-6)
    a = pooled(k, 4)  # agents: pooled keys
    va = torch.softmax(8**-0.5 * torch.einsum("bnhd,bkhd->bhnk", a, k), -1) @ v.transpose(1, 2)
    want = (torch.softmax(8**-0.5 * torch.einsum("bqhd,bnhd->bhqn", q, a), -1) @ va).transpose(1, 2)
    assert_close("formula", want, out, 2e-5)


def test_padded_positions_give_zero_and_padding_is_as_if_removed():
    mech = attnkit.create("agent", heads=2, head_dim=8, num_agents=4, block_size=3, kernel_size=1)
    q, k, v = make_qkv(1, 20, 20, 2, 2, 8)
    mask = torch.ones(1, 20, dtype=torch.bool)
    mask[0, 5:9] = False
    for pattern in ("noncausal_self", "causal_self"):
        for path in ("reference", "sdpa"):
            out = mech(q, k, v, pattern=pattern, key_padding_mask=mask, path=path)
            assert out[:, ~mask[0]].abs().max() == 0
            keep = mask[0]  # kernel 1: the DWC has no neighbours, so removing tokens is the same sequence
            want = mech(q[:, keep], k[:, keep], v[:, keep], pattern=pattern, path=path)
            assert_close(f"{pattern} {path}", want, out[:, keep], 2e-5)


def test_decoding_step_by_step_equals_one_call():
    mech = attnkit.create("agent", heads=4, head_dim=8, block_size=3)
    q, k, v = make_qkv(1, 11, 11, 4, 2, 8)
    full = mech(q, k, v, pattern="causal_self")
    state, outs = None, []
    for i in range(11):
        o, state = mech(q[:, i : i + 1], k[:, i : i + 1], v[:, i : i + 1], pattern="causal_self", state=state,
                        return_state=True)  # fmt: skip
        outs.append(o)
    assert_close("steps", full, torch.cat(outs, 1), 2e-5)
    assert state.q.shape == (1, 11, 4, 8) and state.k.shape == (1, 11, 2, 8)


@pytest.mark.parametrize(
    ("option", "value"),
    [("num_agents", 0), ("num_agents", 2**70), ("kernel_size", 4), ("kernel_size", 0), ("block_size", -2),
     ("block_size", 2**70), ("num_agents", "8")],
)  # fmt: skip
def test_options_are_checked(option, value):
    with pytest.raises(InvalidOption, match=option):
        attnkit.create("agent", heads=2, head_dim=8, **{option: value})


def test_dwc_is_trained():
    mech = attnkit.create("agent", heads=2, head_dim=8)
    q, k, v = make_qkv(1, 10, 10, 2, 2, 8)
    mech(q, k, v, pattern="noncausal_self").sum().backward()
    assert mech.dwc.grad.abs().sum() > 0


def test_fast_path_memory_is_linear_in_noncausal_and_blocked_in_causal():
    t, h, d = 1024, 2, 16
    q, k, v = make_qkv(1, t, t, h, h, d)
    mech = attnkit.create("agent", heads=h, head_dim=d, num_agents=16, block_size=64)
    numel, shape = largest_tensor(lambda: mech(q, k, v, pattern="noncausal_self", path="sdpa"))
    assert numel <= t * h * d, shape  # q's size: no [T, T] and no [T, n] kept
    numel, shape = largest_tensor(lambda: mech(q, k, v, pattern="causal_self", path="sdpa"))
    blocks = t // 64
    # at most each query's scores over the agents and its own block: T (T / bs + bs), never [T, T]
    assert numel <= t * (blocks + 64) * h < t * t * h, shape
