"""Peer adapters (attnkit.bench.peers): each runs, counts FLOPs, and the exact ones match attnkit.

Every test skips when its peer package is not installed (``pip install 'attnkit[peers]'``).
FlexAttention compiles on CPU (tens of seconds), so its tests are marked slow.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import attnkit
from attnkit.bench.cases import Case, peer_cases
from attnkit.bench.peers import PEERS, available_peers, peer_call
from attnkit.errors import InvalidOption
from attnkit.patterns import as_pattern
from attnkit.testing import make_qkv

ALL = ("noncausal_self", "causal_self", "noncausal_cross", "causal_cross")
# tiny settings of each peer's knob, so that T = 64 still exercises its structure (several blocks, clusters...)
TINY = {
    "local-attention": {"window": 16},
    "flex-attention": {},
    "flex-attention-window": {"window": 16},
    "flex-attention-block-sparse": {"block": 8, "global_blocks": 1, "window_blocks": 1, "random_blocks": 2},
    "flex-attention-dilated": {"dilation": 3, "heterogeneous": True, "local": 2, "block": 8},
    "flex-attention-neighborhood": {"kernel_size": 3, "dilation": 2},
    "flex-attention-swin-window": {"window_size": 3, "shift": True},
    "performer-pytorch": {"num_features": 32},
    "reformer-pytorch": {"bucket_size": 8, "n_hashes": 2},
    "routing-transformer": {"num_clusters": 4},
    "nystrom-attention": {"num_landmarks": 16},
    "linformer": {"proj_len": 16},
    "agent-attention-pytorch": {"num_agents": 8},
}
FLEX = (
    "flex-attention",
    "flex-attention-window",
    "flex-attention-block-sparse",
    "flex-attention-dilated",
    "flex-attention-neighborhood",
    "flex-attention-swin-window",
)


def need(name: str) -> None:
    pytest.importorskip(PEERS[name].module)


def tiny_case(name: str, pattern: str, mode: str = "fwd", tokens: int = 64, **options) -> Case:
    spec = PEERS[name]
    opts = {**spec.options, **TINY[name], **options}
    return Case(
        "peer",
        spec.mechanism,
        "peer",
        pattern,
        mode,
        tokens,
        heads=2,
        kv_heads=2,
        head_dim=16,
        options=opts,
        runs=1,
        peer=name,
    )


def run(case: Case):
    grad = case.mode == "fwdbwd"
    q, k, v = make_qkv(case.batch, case.tq, case.tk, case.heads, case.kv_heads, case.head_dim, requires_grad=grad)
    fn, flops = peer_call(case, q, k, v)
    return fn, flops, (q, k, v)


@pytest.mark.parametrize("name", [n for n in PEERS if n not in FLEX])
def test_peer_runs_every_pattern_and_mode(name):
    need(name)
    for pattern in sorted(PEERS[name].patterns):
        for mode in ("fwd", "fwdbwd"):
            case = tiny_case(name, pattern, mode)
            fn, flops, _ = run(case)
            for _ in range(2):  # a second call: nothing is consumed by the first (graphs, caches)
                out = fn()
                assert torch.isfinite(out).all(), f"{name} {pattern} {mode}: non-finite output"
            assert out.shape[-2] == case.tq or out.shape[-2] == case.tk, out.shape  # peers' own layouts
            assert flops > 0


@pytest.mark.parametrize("pattern", ["noncausal_self", "causal_self"])
@pytest.mark.parametrize(("tokens", "window"), [(64, 16), (96, 17), (40, 256)])  # padded, divisible, one block
def test_local_attention_equals_sliding_window(pattern, tokens, window):
    need("local-attention")
    case = tiny_case("local-attention", pattern, tokens=tokens, window=window)
    fn, flops, (q, k, v) = run(case)
    out = fn().transpose(1, 2)  # [B,H,T,D] -> [B,T,H,D]
    ref = attnkit.attend(q, k, v, "sliding_window", pattern=pattern, window=window)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    mech = attnkit.create("sliding_window", window=window)
    # the same useful-FLOP count (flops() takes a Pattern: it compares with `is`)
    assert flops == pytest.approx(mech.flops(case.shape(), as_pattern(pattern)))


def test_performer_cross_patterns_agree():
    # FAVOR+ without causal masking is query-independent: causal_cross computes what noncausal_cross does
    need("performer-pytorch")
    outs = [run(tiny_case("performer-pytorch", p))[0]() for p in ("noncausal_cross", "causal_cross")]
    torch.testing.assert_close(outs[0], outs[1])


@pytest.mark.slow
def test_flex_matches_attnkit():
    need("flex-attention")
    checks = [
        ("flex-attention", "causal_self", "softmax", {}),
        ("flex-attention", "noncausal_cross", "softmax", {}),
        ("flex-attention-window", "noncausal_self", "sliding_window", {"window": 16}),
        ("flex-attention-block-sparse", "causal_self", "block_sparse", TINY["flex-attention-block-sparse"]),
        ("flex-attention-dilated", "causal_self", "dilated", TINY["flex-attention-dilated"]),
        ("flex-attention-neighborhood", "noncausal_self", "neighborhood", TINY["flex-attention-neighborhood"]),
        ("flex-attention-neighborhood", "causal_self", "neighborhood", TINY["flex-attention-neighborhood"]),
        ("flex-attention-swin-window", "noncausal_self", "window", TINY["flex-attention-swin-window"]),
    ]
    for name, pattern, mech, options in checks:
        case = tiny_case(name, pattern, **options)
        fn, flops, (q, k, v) = run(case)
        out = fn().transpose(1, 2)
        assert torch.isfinite(out).all() and flops > 0
        grid = {"spatial_shape": (8, 8)} if attnkit.info(mech).spatial else {}  # the peer's grid of 64 tokens
        ref = attnkit.attend(q, k, v, mech, pattern=pattern, **case.options, **grid)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_flex_is_forward_only_on_cpu():
    need("flex-attention")
    with pytest.raises(InvalidOption, match="fwd"):
        run(tiny_case("flex-attention", "causal_self", "fwdbwd"))


def test_peer_cases_only_supported():
    kw = dict(lengths=(256, 320), patterns=ALL, dtypes=("float32",), modes=("fwd", "fwdbwd", "decode"), runs=3)
    cases = peer_cases(device="cpu", **kw)
    names = available_peers()
    assert {c.peer for c in cases} == set(names)
    for c in cases:
        spec = PEERS[c.peer]
        assert (c.kind, c.path, c.mechanism) == ("peer", "peer", spec.mechanism)
        assert c.pattern in spec.patterns and c.mode in ("fwd", "fwdbwd")
        assert c.options == spec.options and c.runs == 3 and c.heads == c.kv_heads
        assert Case(**dataclasses.asdict(c)) == c  # plain data: it crosses to the worker process
        assert not (c.peer in FLEX and c.mode == "fwdbwd"), "FlexAttention has no CPU backward"
        assert not (c.peer == "reformer-pytorch" and c.tokens == 320), "T % (2 * bucket) != 0 is skipped"
    if "local-attention" in names:
        got = {(c.pattern, c.mode, c.tokens) for c in cases if c.peer == "local-attention"}
        assert got == {(p, m, t) for p in ALL[:2] for m in ("fwd", "fwdbwd") for t in (256, 320)}
        assert all(c.options == {"window": 256} for c in cases if c.mechanism == "sliding_window")
    if "flex-attention" in names:
        cuda = peer_cases(device="cuda", **kw)
        assert any(c.peer == "flex-attention" and c.mode == "fwdbwd" for c in cuda)
    assert peer_cases(device="cpu", **{**kw, "patterns": ("causal_cross",), "modes": ("decode",)}) == []
    half = peer_cases(device="cpu", **{**kw, "dtypes": ("bfloat16",)})
    assert half and not any(c.peer == "nystrom-attention" for c in half), "nystrom-attention is float32 only"
    with pytest.raises(InvalidOption):
        peer_cases(device="cpu", **{**kw, "dtypes": ("float8",)})
    # --mechanisms selects peers too: only those whose counterpart is chosen
    chosen = peer_cases(device="cpu", names="nystrom,sliding*", **kw)
    assert {c.mechanism for c in chosen} <= {"nystrom", "sliding_window"}
    assert {c.peer for c in chosen} == {n for n in names if PEERS[n].mechanism in ("nystrom", "sliding_window")}


def test_peer_call_rejects_what_the_peer_cannot_do():
    # refused before anything is imported or built: no peer package needed
    with pytest.raises(InvalidOption, match="noncausal_cross"):
        run(tiny_case("local-attention", "noncausal_cross"))
    with pytest.raises(InvalidOption, match="unknown peer"):
        run(dataclasses.replace(tiny_case("local-attention", "causal_self"), peer="nope"))
    with pytest.raises(InvalidOption, match="kv_heads"):
        case = dataclasses.replace(tiny_case("local-attention", "causal_self"), kv_heads=1)
        peer_call(case, *make_qkv(1, 64, 64, 2, 1, 16))


def test_reformer_rejects_unbucketable_length():
    need("reformer-pytorch")
    with pytest.raises(InvalidOption, match="bucket_size"):
        run(tiny_case("reformer-pytorch", "causal_self", tokens=72))
