"""halo (sliding window: one P2P hop of the window's keys) and sum (sigmoid: partial outputs add) against one
process.

One spawn per world size runs every case; each rank builds the same full tensors (same seed), attends its shard,
and compares its rows of the output and of the q/k/v gradients with the mechanism's reference on the whole
sequence.
"""

from __future__ import annotations

import itertools
import zlib

import pytest
import torch

from attnkit import create
from attnkit.distributed import attend, shard
from attnkit.distributed.api import STRATEGIES, _load_strategies, choose
from attnkit.distributed.layout import positions
from attnkit.errors import InvalidOption
from attnkit.patterns import Pattern
from distributed_cases import mismatches, run_world

T, B, HQ, D = 24, 2, 4, 8
PATTERNS = ("causal_self", "noncausal_self")
LAYOUTS = ("contiguous", "zigzag")
VARIANTS = ("gqa", "gqa+padding", "mha+padding")  # kv heads HQ/2 or HQ; random key padding with one rank's shard padded
# (strategy, mechanism, options): windows 1 (no halo), 2, and 4 (= the zigzag chunk + 1 at W = 4: the largest halo)
SETUPS = [("halo", "sliding_window", {"window": w}) for w in (1, 2, 4)] + [
    ("halo", "neighborhood", {"kernel_size": 3}),  # 1-D NATTEN window, shifted inwards at the sequence's ends
    ("halo", "neighborhood", {"kernel_size": 3, "is_causal": True}),  # causal along the axis in noncausal_self too
    ("sum", "sigmoid", {}),
    ("sum", "sigmoid", {"bias": -1.5}),
]
CASES = [
    (i, pattern, layout, VARIANTS[j % len(VARIANTS)], "fp64")
    for j, (i, pattern, layout) in enumerate(itertools.product(range(len(SETUPS)), PATTERNS, LAYOUTS))
] + [(i, "causal_self", "zigzag", "gqa+padding", "fp32") for i in (1, 5)]


def _inputs(variant: str, world: int, layout: str, dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    hkv = HQ // 2 if variant.startswith("gqa") else HQ
    q = torch.randn(B, T, HQ, D, generator=gen, dtype=dtype)
    k = torch.randn(B, T, hkv, D, generator=gen, dtype=dtype)
    v = torch.randn(B, T, hkv, D, generator=gen, dtype=dtype)
    grad = torch.randn(B, T, HQ, D, generator=gen, dtype=dtype)
    mask = None
    if variant.endswith("padding"):
        mask = torch.rand(B, T, generator=gen) > 0.3
        mask[1, positions(T, world, world - 1, layout)] = False  # batch 1: the last rank holds only padding
        mask[1, 0] = True  # ... but not the whole sequence when W = 1
    return q, k, v, grad, mask


def _error(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach(), want.detach()
    return float((got - want).abs().max() / want.abs().max().clamp(min=1.0))


def _one_case(rank, world, setup, pattern, layout, variant, dtype) -> float:
    """Largest relative error of this rank's output and q/k/v gradients against one process."""
    strategy, name, options = SETUPS[setup]
    mech = create(name, heads=HQ, head_dim=D, **options)
    seed = zlib.crc32(f"{setup}{pattern}{layout}{variant}".encode())  # the same on every rank (hash() is not)
    q, k, v, grad, mask = _inputs(variant, world, layout, dtype, seed)
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    line = {"spatial_shape": (T,)} if mech.spatial else {}  # neighborhood along the sequence: a 1-D grid
    want = mech(*full, pattern=pattern, key_padding_mask=mask, path="reference", **line)
    want.backward(grad)
    cut = lambda t: shard(t, world, rank, layout)  # noqa: E731
    local = [cut(t).detach().requires_grad_() for t in (q, k, v)]
    got = attend(*local, mech, pattern=pattern, strategy=strategy, layout=layout,
                 key_padding_mask=None if mask is None else cut(mask))  # fmt: skip
    got.backward(cut(grad))
    errors = [_error(got, cut(want))] + [_error(a.grad, cut(b.grad)) for a, b in zip(local, full, strict=True)]
    return max(errors)


def _communication(rank, world) -> dict[str, int]:
    """What one step of each strategy sends: CommDebugMode counts inside the strategy, P2P_CALLS the halo hops."""
    from torch.distributed.tensor.debug import CommDebugMode

    from attnkit.distributed._collectives import P2P_CALLS

    _load_strategies()
    counts: dict[str, int] = {}
    for strategy, name in (("sum", "sigmoid"), ("halo", "sliding_window")):
        original = STRATEGIES[strategy].run

        def counted(call, original=original, strategy=strategy):
            with CommDebugMode() as mode:
                out = original(call)
            counts.update({f"{strategy} forward {op}": n for op, n in mode.get_comm_counts().items()})
            return out

        STRATEGIES[strategy].run = counted
        P2P_CALLS.clear()
        try:
            q, k, v, grad, mask = _inputs("gqa+padding", world, "contiguous", torch.float64, seed=1)
            local = [shard(t, world, rank, "contiguous").requires_grad_() for t in (q, k, v)]
            options = {"window": 3} if strategy == "halo" else {}
            out = attend(*local, name, pattern="noncausal_self", strategy=strategy, layout="contiguous",
                         key_padding_mask=shard(mask, world, rank, "contiguous"), **options)  # fmt: skip
            with CommDebugMode() as mode:
                out.backward(shard(grad, world, rank, "contiguous"))
            counts.update({f"{strategy} backward {op}": n for op, n in mode.get_comm_counts().items()})
            counts.update({f"{strategy} p2p {phase}": n for phase, n in P2P_CALLS.items()})
        finally:
            STRATEGIES[strategy].run = original
    return counts


def _refusals(rank, world) -> dict[str, str]:
    """A window longer than a chunk: every rank refuses, naming ring."""
    q, k, v, _, _ = _inputs("gqa", world, "zigzag", torch.float64, seed=2)
    local = [shard(t, world, rank, "zigzag") for t in (q, k, v)]
    chunk = T // (2 * world)
    try:
        attend(*local, "sliding_window", pattern="causal_self", strategy="halo", layout="zigzag", window=chunk + 2)
    except InvalidOption as err:
        return {"long window": str(err)}
    return {}


def _all_cases(rank: int, world: int) -> dict:
    torch.manual_seed(0)
    results = {}
    for case in CASES:
        setup, pattern, layout, variant, precision = case
        dtype = torch.float64 if precision == "fp64" else torch.float32
        results[case] = _one_case(rank, world, setup, pattern, layout, variant, dtype)
    results["comm"] = _communication(rank, world) if world > 1 else {}
    results["refusals"] = _refusals(rank, world)
    return results


@pytest.fixture(scope="module", params=[1, 2, 3, 4], ids=lambda w: f"W{w}")
def world_results(request):
    return run_world(request.param, _all_cases)


def test_every_case_matches_one_process_on_every_rank(world_results):
    world, per_rank = world_results
    bad = mismatches(CASES, per_rank)
    assert not bad, f"W={world}: {len(bad)} of {len(CASES)} cases differ from one process: {bad[:5]}"


def test_sum_gathers_keys_and_mask_forward_and_reduce_scatters_once_backward(world_results):
    world, per_rank = world_results
    if world == 1:
        pytest.skip("no collectives with one rank")
    for counts in (r["comm"] for r in per_rank):
        gathers = [n for op, n in counts.items() if op.startswith("sum forward") and "allgather" in op]
        scatters = [n for op, n in counts.items() if op.startswith("sum backward") and "reduce_scatter" in op]
        assert gathers == [2] and scatters == [1], counts  # k and v together, then the padding mask
        assert not any(op.startswith("sum") and "p2p" in op for op in counts), counts


def test_halo_is_one_p2p_hop_forward_and_one_backward_with_no_collective(world_results):
    world, per_rank = world_results
    if world == 1:
        pytest.skip("no communication with one rank")
    for counts in (r["comm"] for r in per_rank):
        assert counts.get("halo p2p forward") == 1 and counts.get("halo p2p backward") == 1, counts
        assert not any(op.startswith(("halo forward", "halo backward")) for op in counts), counts


def test_a_window_longer_than_a_chunk_is_refused_pointing_to_ring(world_results):
    world, per_rank = world_results
    for r in per_rank:
        assert "strategy='ring'" in r["refusals"]["long window"], r["refusals"]


@pytest.mark.parametrize(
    ("name", "expected"), [("sliding_window", "halo"), ("sigmoid", "sum"), ("linear", "lasp2"), ("retention", "lasp2")]
)
def test_auto_picks_the_family_strategy(name, expected):
    sizes = dict(layout="contiguous", world=2, total=4096, heads=4, kv_heads=2)
    chosen = choose(create(name, heads=4, head_dim=8), Pattern.CAUSAL_SELF, "auto", **sizes)
    assert chosen.name == expected


def test_auto_takes_halo_for_a_1d_neighborhood_and_refuses_a_grid_one():
    sizes = dict(layout="zigzag", world=2, total=64, heads=4, kv_heads=4)
    assert choose(create("neighborhood", kernel_size=5), Pattern.NONCAUSAL_SELF, "auto", **sizes).name == "halo"
    with pytest.raises(InvalidOption, match="sequence axis"):
        choose(create("neighborhood", kernel_size=(3, 3)), Pattern.NONCAUSAL_SELF, "halo", **sizes)
    with pytest.raises(InvalidOption, match="grid"):
        attend(*(torch.randn(1, 8, 2, 4) for _ in range(3)), "cswin", pattern="noncausal_self")


@pytest.mark.parametrize("strategy", ["halo", "sum", "lasp2"])
def test_each_strategy_refuses_softmax_with_its_reason(strategy):
    _load_strategies()
    reason = STRATEGIES[strategy].refuses(create("softmax"), Pattern.CAUSAL_SELF, layout="zigzag", world=2, total=64,
                                          heads=4, kv_heads=4)  # fmt: skip
    assert reason and "softmax" in reason


def test_auto_takes_halo_for_a_short_window_and_ring_for_a_window_longer_than_a_chunk():
    sizes = dict(layout="zigzag", world=2, total=64, heads=4, kv_heads=4)  # zigzag chunks of 16 tokens
    short, long = create("sliding_window", window=8), create("sliding_window", window=40)
    assert choose(short, Pattern.CAUSAL_SELF, "auto", **sizes).name == "halo"
    assert choose(long, Pattern.CAUSAL_SELF, "auto", **sizes).name == "ring"
