"""attnkit.Attention: projections, GQA, RoPE, cross attention, decoding with state."""

from __future__ import annotations

import pytest
import torch

import attnkit
from attnkit import InvalidOption, ShapeError
from attnkit.ops.rope import apply_rope
from attnkit.testing import assert_close, random_chunks

MECHS = ["softmax", "sigmoid", "linear", "sliding_window"]


@pytest.mark.parametrize("mechanism", MECHS)
def test_self_attention_shapes_and_grads(mechanism):
    layer = attnkit.Attention(48, heads=4, kv_heads=2, mechanism=mechanism, pattern="causal_self", rope=True)
    x = torch.randn(2, 13, 48, requires_grad=True)
    y = layer(x)
    assert y.shape == (2, 13, 48)
    y.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert all(p.grad is not None for p in layer.parameters())


@pytest.mark.parametrize("mechanism", MECHS)
def test_layer_decoding_with_state_matches_full_pass(mechanism):
    """Prefill plus token-by-token decoding through the layer (RoPE offsets included) equals one pass."""
    torch.manual_seed(0)
    layer = attnkit.Attention(
        32,
        heads=4,
        kv_heads=1,
        mechanism=mechanism,
        rope=True,
        **({"window": 5} if mechanism == "sliding_window" else {}),
    )
    x = torch.randn(2, 23, 32)
    with torch.no_grad():
        full = layer(x)
        state, outs, start = None, [], 0
        for n in random_chunks(23, seed=1):
            y, state = layer(x[:, start : start + n], state=state, return_state=True)
            outs.append(y)
            start += n
    assert_close("decoded", full, torch.cat(outs, 1), 1e-5)
    assert state.offset == 23


@pytest.mark.parametrize("mechanism", ["softmax", "sigmoid", "linear"])
@pytest.mark.parametrize("pattern", ["noncausal_cross", "causal_cross"])
def test_cross_attention_reads_context(mechanism, pattern):
    layer = attnkit.Attention(32, heads=4, mechanism=mechanism, pattern=pattern, context_dim=20)
    x, ctx = torch.randn(2, 7, 32), torch.randn(2, 11, 20)
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[1, 6:] = False
    y = layer(x, ctx, key_padding_mask=mask)
    assert y.shape == (2, 7, 32)
    # padded context tokens change nothing
    y2 = layer(x, torch.cat([ctx[:, :6], torch.randn(2, 5, 20)], 1), key_padding_mask=mask)
    torch.testing.assert_close(y[1], y2[1])


def test_layer_gqa_matches_explicit_computation():
    torch.manual_seed(0)
    layer = attnkit.Attention(32, heads=4, kv_heads=2, mechanism="softmax", pattern="noncausal_self")
    x = torch.randn(1, 6, 32)
    q = layer.q_proj(x).view(1, 6, 4, 8)
    k = layer.k_proj(x).view(1, 6, 2, 8).repeat_interleave(2, 2)
    v = layer.v_proj(x).view(1, 6, 2, 8).repeat_interleave(2, 2)
    probs = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, k) / 8**0.5, -1)
    expected = layer.o_proj(torch.einsum("bhqk,bkhd->bqhd", probs, v).reshape(1, 6, 32))
    torch.testing.assert_close(layer(x), expected)


def test_rope_makes_scores_depend_on_distance_only():
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    scores = []
    for shift in (0, 5, 100):
        qr = apply_rope(q, torch.tensor([7 + shift]))
        kr = apply_rope(k, torch.tensor([3 + shift]))
        scores.append((qr * kr).sum())
    torch.testing.assert_close(scores[0], scores[1])
    torch.testing.assert_close(scores[0], scores[2], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(apply_rope(q, torch.tensor([0])), q)  # position 0 is the identity


def test_layer_errors():
    with pytest.raises(InvalidOption, match="must be between 1 and heads=4"):
        attnkit.Attention(32, heads=4, query_heads=8)
    with pytest.raises(InvalidOption, match="multiple of kv_heads=3"):
        attnkit.Attention(32, heads=4, kv_heads=3)
    with pytest.raises(InvalidOption, match="rope=True needs a self pattern"):
        attnkit.Attention(32, heads=4, pattern="noncausal_cross", rope=True)
    with pytest.raises(attnkit.UnsupportedPattern, match="sliding_window does not support pattern noncausal_cross"):
        attnkit.Attention(32, heads=4, mechanism="sliding_window", pattern="noncausal_cross")
    layer = attnkit.Attention(32, heads=4)
    with pytest.raises(ShapeError, match=r"x must be \[B, T, 32\]; got shape \(1, 3, 31\)"):
        layer(torch.randn(1, 3, 31))
    with pytest.raises(InvalidOption, match="pass no context"):
        layer(torch.randn(1, 3, 32), torch.randn(1, 3, 32))
    with pytest.raises(InvalidOption, match="needs context="):
        attnkit.Attention(32, heads=4, pattern="causal_cross")(torch.randn(1, 3, 32))
    with pytest.raises(InvalidOption, match="sliding_window has no option 'windw'"):
        attnkit.Attention(32, heads=4, mechanism="sliding_window", windw=3)


def test_sparse_query_heads_layer():
    """query_heads=2 of 8: a quarter of the query projection and of the attention work, same output size."""
    torch.manual_seed(0)
    full = attnkit.Attention(64, heads=8, pattern="noncausal_self")
    sqa = attnkit.Attention(64, heads=8, query_heads=2, kv_heads=1, pattern="noncausal_self")
    assert sqa.head_dim == full.head_dim == 8 and sqa.heads == 2
    assert sqa.q_proj.weight.numel() * 4 == full.q_proj.weight.numel()
    assert sqa.o_proj.weight.numel() * 4 == full.o_proj.weight.numel()
    x = torch.randn(2, 10, 64)
    q = sqa.q_proj(x).view(2, 10, 2, 8)
    k = sqa.k_proj(x).view(2, 10, 1, 8).expand(-1, -1, 2, -1)
    v = sqa.v_proj(x).view(2, 10, 1, 8).expand(-1, -1, 2, -1)
    probs = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, k) / 8**0.5, -1)
    expected = sqa.o_proj(torch.einsum("bhqk,bkhd->bqhd", probs, v).reshape(2, 10, 16))
    torch.testing.assert_close(sqa(x), expected)
