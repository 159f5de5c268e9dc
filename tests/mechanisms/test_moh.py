"""moh: the reference against a per-token transcription of the official router; the gather path runs
only the heads each token uses and agrees with the reference, with gradients to the router."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import attnkit
from attnkit.errors import InvalidOption
from attnkit.mechanisms import moh as moh_module
from attnkit.testing import assert_close, make_qkv


def router_gates(mech, q_tok):
    """Gates of one token, transcribed from SkyworkAI/MoH (``q_tok``: the token's heads concatenated)."""
    h, hs, k = mech.heads, mech.shared, mech.topk
    probs = F.softmax(mech.w_routed.weight.double() @ q_tok, dim=0)  # [H - hs]
    top = sorted(range(h - hs), key=lambda i: -float(probs[i]))[:k]
    routed = torch.zeros(h - hs, dtype=torch.float64)
    for i in top:
        routed[i] = probs[i] / sum(probs[j] for j in top) * k
    if hs == 0:
        return routed
    shared = F.softmax(mech.w_shared.weight.double() @ q_tok, 0) * hs if hs > 1 else torch.ones(1, dtype=torch.float64)
    a1, a2 = 2 * F.softmax(mech.w_mix.weight.double() @ q_tok, dim=0)
    return torch.cat([a1 * shared, a2 * routed])


@torch.no_grad()
def formula(mech, q, k, v, causal):
    b, tq, h, d = q.shape
    g = h // k.shape[2]
    out = torch.zeros(b, tq, h, v.shape[-1], dtype=torch.float64)
    for i in range(b):
        for t in range(tq):
            gates = router_gates(mech, q[i, t].reshape(-1).double())
            for head in range(h):
                if gates[head] == 0:
                    continue
                keys = k.shape[1] if not causal else t + 1
                dots = [float(q[i, t, head] @ k[i, j, head // g]) / math.sqrt(d) for j in range(keys)]
                p = torch.tensor(dots, dtype=torch.float64).softmax(0)
                out[i, t, head] = gates[head] * (p[:, None] * v[i, :keys, head // g].double()).sum(0)
    return out


def build(heads=8, head_dim=16, **options):
    torch.manual_seed(0)
    return attnkit.create("moh", heads=heads, head_dim=head_dim, **options)


@pytest.mark.parametrize("options", [{}, {"shared_heads": 0, "routed_heads": 3}, {"shared_heads": 1}])
@pytest.mark.parametrize("pattern", ["causal_self", "noncausal_cross"])
def test_reference_is_the_formula(pattern, options):
    mech = build(**options)
    q, k, v = make_qkv(2, 9, 9 if pattern == "causal_self" else 13, 8, 2, 16, dtype=torch.float64)
    ref = mech(q, k, v, pattern=pattern, path="reference")
    assert_close("reference", formula(mech, q, k, v, pattern == "causal_self"), ref, 1e-12)


def test_each_token_uses_shared_plus_k_heads():
    mech = build(shared_heads=3, routed_heads=2)
    q, k, v = make_qkv(2, 40, 40, 8, 2, 16)
    out = mech(q, k, v, pattern="noncausal_self", path="reference")
    used = out.abs().sum(-1) > 0  # [B, T, H]
    assert (used.sum(-1) == 5).all()
    assert used[:, :, :3].all()  # the shared heads


def test_gather_computes_only_the_used_heads(monkeypatch):
    """SDPA sees exactly hs * T + k * T (query, head) pairs per batch row: the compute of hs + k heads."""
    rows = []
    real = F.scaled_dot_product_attention

    def counting(q, *args, **kwargs):
        rows.append(q.numel() // q.shape[-1])  # (query, head) pairs in this call
        return real(q, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    mech = build(shared_heads=2, routed_heads=3)
    b, t = 2, 100
    q, k, v = make_qkv(b, t, t, 8, 4, 16)
    mech(q, k, v, pattern="causal_self", path="gather")
    assert sum(rows) == b * (2 + 3) * t
    rows.clear()
    mech(q, k, v, pattern="causal_self", path="dense")
    assert sum(rows) == b * 8 * t


@pytest.mark.parametrize("options", [{"shared_heads": 0, "routed_heads": 2}, {"shared_heads": 2, "routed_heads": 1}])
@pytest.mark.parametrize("pattern", ["causal_self", "noncausal_self", "causal_cross"])
def test_gather_matches_reference_with_grads(monkeypatch, pattern, options):
    monkeypatch.setattr(moh_module, "ROUTED_CHUNK", 8)  # several chunks per routed head
    mech = build(**options)
    tk = 45 if pattern.endswith("self") else 31
    q, k, v = make_qkv(2, 45, tk, 8, 2, 16, requires_grad=True)
    kpm = torch.rand(2, tk, generator=torch.Generator().manual_seed(2)) > 0.25
    ref = mech(q, k, v, pattern=pattern, key_padding_mask=kpm, path="reference")
    g = torch.randn_like(ref)
    params = [p for p in mech.parameters()]
    ref_grads = torch.autograd.grad(ref, [q, k, v, *params], g)
    for path in ("gather", "dense"):
        out = mech(q, k, v, pattern=pattern, key_padding_mask=kpm, path=path)
        assert_close(path, ref, out, 1e-5)
        for i, (r, f) in enumerate(zip(ref_grads, torch.autograd.grad(out, [q, k, v, *params], g), strict=True)):
            assert_close(f"{path} grad {i}", r, f, 4e-5)  # the suite's gradient tolerance (2 x outputs')
        assert all(p.abs().sum() > 0 for p in ref_grads[3:]), "the router gets gradients through the chosen gates"


def test_gather_continues_a_cache(monkeypatch):
    monkeypatch.setattr(moh_module, "ROUTED_CHUNK", 4)
    mech = build()
    q, k, v = make_qkv(1, 70, 70, 8, 8, 16)
    full = mech(q, k, v, pattern="causal_self", path="reference")
    _, cache = mech(q[:, :50], k[:, :50], v[:, :50], pattern="causal_self", return_state=True, path="gather")
    rest = mech(q[:, 50:], k[:, 50:], v[:, 50:], pattern="causal_self", state=cache, path="gather")
    assert_close("after cache", full[:, 50:], rest, 1e-5)


def test_auto_takes_gather_where_it_was_measured_faster():
    mech = build()
    n = moh_module.GATHER_MIN_TOKENS
    q, k, v = make_qkv(1, n, n, 8, 8, 16)
    mech(q, k, v, pattern="noncausal_self")
    assert mech.last_path == "gather"
    mech(q, k, v, pattern="causal_self")
    assert mech.last_path == "dense"
    mech(q[:, :8], k[:, :8], v[:, :8], pattern="noncausal_self")
    assert mech.last_path == "dense"


@pytest.mark.parametrize("options", [{"shared_heads": 8}, {"shared_heads": 4, "routed_heads": 5}])
def test_bad_head_counts_raise(options):
    with pytest.raises(InvalidOption, match="routed"):
        build(**options)
