"""attnkit.Attention: projections, GQA, RoPE, cross attention, decoding with state."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch

import attnkit
from attnkit import InvalidOption, Pattern, ShapeError
from attnkit.mechanism import REGISTRY, Complexity, Mechanism, Paper, register_mechanism
from attnkit.ops.rope import apply_rope
from attnkit.testing import assert_close, cases, random_chunks

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
    with pytest.raises(InvalidOption, match="sparse_query_heads=8 must be between 1 and heads=4"):
        attnkit.Attention(32, heads=4, sparse_query_heads=8)
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
    """sparse_query_heads=2 of 8: a quarter of the query projection and of the attention work, same output size."""
    torch.manual_seed(0)
    full = attnkit.Attention(64, heads=8, pattern="noncausal_self")
    sqa = attnkit.Attention(64, heads=8, sparse_query_heads=2, kv_heads=1, pattern="noncausal_self")
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


# ---- bad layer arguments and inputs raise typed errors naming the values ----------------------------


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"heads": 0}, ["heads=0", "[1, "]),
        ({"heads": -4}, ["heads=-4", "[1, "]),
        ({"heads": 2.5}, ["heads=2.5"]),
        ({"heads": "8"}, ["heads='8'"]),
        ({"heads": True}, ["heads=True"]),
        ({"heads": 2**70}, [f"heads={2**70}"]),
        ({"dim": 0}, ["dim=0"]),
        ({"dim": 32.0}, ["dim=32.0"]),
        ({"kv_heads": 0}, ["kv_heads=0", "[1, "]),
        ({"kv_heads": 3}, ["4", "kv_heads=3", "multiple"]),
        ({"kv_heads": 8}, ["4", "kv_heads=8", "multiple"]),
        ({"head_dim": 0}, ["head_dim=0", "[1, "]),
        ({"head_dim": 2**70}, [f"head_dim={2**70}"]),
        ({"context_dim": 0}, ["context_dim=0"]),
        ({"sparse_query_heads": 8}, ["sparse_query_heads=8", "heads=4"]),
        ({"sparse_query_heads": 0}, ["sparse_query_heads=0", "heads=4"]),
    ],
    ids=repr,
)
def test_layer_refuses_bad_sizes(kwargs, words):
    args = {"dim": 32, "heads": 4, **kwargs}
    with pytest.raises(InvalidOption) as err:
        attnkit.Attention(args.pop("dim"), **args)
    assert all(w in str(err.value) for w in words), str(err.value)


def test_layer_refuses_bad_context_and_inputs():
    layer = attnkit.Attention(32, heads=4, pattern="noncausal_cross", context_dim=20)
    x, ctx = torch.randn(2, 7, 32), torch.randn(2, 11, 20)
    assert layer(x, ctx).shape == (2, 7, 32)
    for context, error, words in [
        (torch.randn(2, 11, 19), ShapeError, ["context", "20", "(2, 11, 19)"]),
        (torch.randn(11, 20), ShapeError, ["context", "[B, S, 20]", "(11, 20)"]),
        (torch.randn(3, 11, 20), ShapeError, ["batch", "2", "3"]),
        (torch.randn(2, 11, 20, dtype=torch.float64), attnkit.DTypeError, ["context", "float64", "float32"]),
        ([[0.0] * 20] * 11, attnkit.DTypeError, ["context", "list"]),
    ]:
        with pytest.raises(error) as err:
            layer(x, context)
        assert all(w in str(err.value) for w in words), str(err.value)
    for bad, error, words in [
        (x.double(), attnkit.DTypeError, ["x", "float64", "float32"]),
        (x.half(), attnkit.DTypeError, ["x", "float16", "float32"]),
        (x.long(), attnkit.DTypeError, ["x", "int64", "float32"]),
        ("x", attnkit.DTypeError, ["x", "str"]),
    ]:
        with pytest.raises(error) as err:
            layer(bad, ctx)
        assert all(w in str(err.value) for w in words), str(err.value)
    assert layer.double()(x.double(), ctx.double()).dtype == torch.float64  # a cast layer takes its dtype


# ---- a layer argument never swallows a mechanism option of the same name -----------------------------


def _first_pattern(case):
    return sorted(case.patterns, key=lambda p: (not p.is_self, p.value))[0]


@pytest.mark.parametrize("case", [c for c in cases() if c.options], ids=lambda c: c.label)
def test_every_option_reaches_the_mechanism_through_the_layer(case):
    """Each example option set, given to the layer, is what the mechanism inside holds, and the layer runs."""
    pattern = _first_pattern(case)
    layer = attnkit.Attention(32, heads=4, kv_heads=2, mechanism=case.mechanism, pattern=pattern, **case.options)
    expected = attnkit.create(case.mechanism, heads=4, head_dim=8, **case.options).options
    assert layer.mechanism.options == expected
    assert all(getattr(layer.mechanism.options, k) == getattr(expected, k) for k in case.options)
    grid = case.grid(6) if case.spatial_dims else None  # a spatial mechanism runs on a grid of the 6 tokens
    x = torch.randn(2, 6, 32)
    out = layer(x, None if pattern.is_self else torch.randn(2, 7, 32), spatial_shape=grid)
    assert out.shape == (2, 6, 32)


def test_sigmoid_bias_and_sqa_query_heads_reach_the_mechanism():
    """The two names that layer arguments used to take: sigmoid's score bias, sqa's query heads."""
    layer = attnkit.Attention(32, heads=4, mechanism="sigmoid", bias=-2.0)
    assert layer.mechanism.options.bias == -2.0 and layer.q_proj.bias is None
    layer = attnkit.Attention(32, heads=4, mechanism="sigmoid", bias=-2.0, proj_bias=True)
    assert layer.mechanism.options.bias == -2.0 and layer.q_proj.bias is not None
    layer = attnkit.Attention(32, heads=8, mechanism="sqa", query_heads=4)
    assert layer.mechanism.options.query_heads == 4 and layer.heads == 8


def test_no_option_is_named_like_an_argument_of_the_calls():
    """An option named like an argument of attend(), create(), Mechanism.forward or Attention could never
    reach its mechanism through that call (the call takes it for itself)."""
    taken = set()
    for fn in (attnkit.attend, attnkit.create, attnkit.Mechanism.forward, attnkit.Attention.__init__):
        taken |= {p.name for p in inspect.signature(fn).parameters.values() if p.kind is not p.VAR_KEYWORD}
    taken -= {"self"}
    clashes = {
        info.name: sorted({f.name for f in dataclasses.fields(info.options)} & taken) for info in attnkit.mechanisms()
    }
    assert not {k: v for k, v in clashes.items() if v}, "options named like call arguments"


def test_layer_refuses_an_ambiguous_argument(clash_mechanism):
    """A mechanism whose option shares a layer argument's name: the layer says so instead of guessing."""
    with pytest.raises(InvalidOption) as err:
        attnkit.Attention(32, heads=4, mechanism=clash_mechanism, rope=True)
    msg = str(err.value)
    assert "rope=True" in msg and "ambiguous" in msg and clash_mechanism in msg, msg
    layer = attnkit.Attention(32, heads=4, mechanism=clash_mechanism)  # not given: nothing is swallowed
    assert layer.mechanism.options.rope == 0.5


@pytest.fixture
def clash_mechanism():
    """A throwaway mechanism with an option named like a layer argument, removed from the registry afterwards."""

    @dataclasses.dataclass(frozen=True)
    class RopeOptions:
        rope: float = 0.5  # a made-up option that clashes with Attention(rope=...)

    class Clash(Mechanism):
        family = "test"
        paper = Paper("none", 2026)
        patterns = frozenset(Pattern)
        exact = False
        complexity = Complexity("O(1)", "O(1)")
        Options = RopeOptions

        def reference(self, x):
            return x.v.repeat_interleave(x.groups, 2)[:, : x.tq], None

        def flops(self, shape, pattern):
            return 0.0

    register_mechanism("_test_clash")(Clash)
    yield "_test_clash"
    REGISTRY._entries.pop("_test_clash")
