"""lasp2 (kernel and decay families over ranks, one all-gather of chunk states) against one process.

One spawn per world size runs every case; each rank builds the same full tensors (same seed), attends its shard
with ``attend(..., strategy="lasp2")``, and compares its rows of the output and of the q/k/v gradients with the
mechanism's reference (the quadratic form) on the whole sequence.
"""

from __future__ import annotations

import itertools
import zlib

import pytest
import torch

from attnkit import create
from attnkit.distributed import attend, shard
from attnkit.distributed.layout import positions
from attnkit.errors import InvalidOption
from distributed_cases import mismatches, run_world

T, B, HQ, D = 24, 2, 4, 8
MECHANISMS = {
    "linear": {"chunk_size": 4},
    "performer": {"num_features": 12, "seed": 3, "chunk_size": 4},
    "cosformer": {"max_len": 32, "chunk_size": 4},
    "hedgehog": {"feature_dim": 6, "chunk_size": 4},
    "retention": {"gammas": (0.9, 0.7, 0.95, 0.5), "chunk_size": 4},
    "lightning": {"activation": "identity", "block_size": 4},
}
PATTERNS = ("causal_self", "noncausal_self")
LAYOUTS = ("contiguous", "zigzag")
VARIANTS = ("gqa", "gqa+padding", "mha+padding")  # kv heads HQ/2 or HQ; random key padding with one rank's shard padded


def _mechanism(name: str):
    torch.manual_seed(11)
    mech = create(name, heads=HQ, head_dim=D, **MECHANISMS[name])
    if name == "hedgehog":  # a map away from its identity start, the same on every rank
        with torch.no_grad():
            for p in mech.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(5), dtype=p.dtype))
    return mech


def _inputs(variant: str, world: int, layout: str, dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    hkv = HQ // 2 if variant.startswith("gqa") else HQ
    q = torch.randn(B, T, HQ, D, generator=gen, dtype=dtype) * 0.5
    k = torch.randn(B, T, hkv, D, generator=gen, dtype=dtype) * 0.5
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


def _one_case(rank, world, name, pattern, layout, variant, dtype) -> float:
    """Largest relative error of this rank's output and q/k/v gradients against one process."""
    mech = _mechanism(name)
    seed = zlib.crc32(f"{name}{pattern}{layout}{variant}".encode())  # the same on every rank (hash() is not)
    q, k, v, grad, mask = _inputs(variant, world, layout, dtype, seed=seed)
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    want = mech(*full, pattern=pattern, key_padding_mask=mask, path="reference")
    want.backward(grad)
    cut = lambda t: shard(t, world, rank, layout)  # noqa: E731
    local = [cut(t).detach().requires_grad_() for t in (q, k, v)]
    got = attend(*local, mech, pattern=pattern, strategy="lasp2", layout=layout,
                 key_padding_mask=None if mask is None else cut(mask))  # fmt: skip
    got.backward(cut(grad))
    errors = [_error(got, cut(want))] + [_error(a.grad, cut(b.grad)) for a, b in zip(local, full, strict=True)]
    return max(errors)


def _parameter_gradients(rank, world) -> dict[str, list[torch.Tensor]]:
    """Hedgehog's feature-map gradients: this rank's part, and one process's (the ranks' parts must add up to it,
    as data parallelism's all-reduce would add them)."""
    q, k, v, grad, mask = _inputs("gqa+padding", world, "zigzag", torch.float64, seed=4)
    mech = _mechanism("hedgehog").double()
    mech(q, k, v, pattern="causal_self", key_padding_mask=mask, path="reference").backward(grad)
    want = [p.grad.clone() for p in mech.parameters()]
    mech.zero_grad()
    cut = lambda t: shard(t, world, rank, "zigzag")  # noqa: E731
    out = attend(cut(q), cut(k), cut(v), mech, pattern="causal_self", strategy="lasp2", layout="zigzag",
                 key_padding_mask=cut(mask))  # fmt: skip
    out.backward(cut(grad))
    return {"mine": [p.grad.clone() for p in mech.parameters()], "one process": want}


def _comm_counts(rank, world) -> dict[str, int]:
    """Collectives of one lasp2 step (forward, then backward), counted by CommDebugMode around the strategy."""
    from torch.distributed.tensor.debug import CommDebugMode

    from attnkit.distributed.api import STRATEGIES, _load_strategies

    _load_strategies()
    strategy = STRATEGIES["lasp2"]
    counts: dict[str, int] = {}
    original = strategy.run

    def counted(call):
        with CommDebugMode() as mode:
            out = original(call)
        counts.update({f"forward {op}": n for op, n in mode.get_comm_counts().items()})
        return out

    strategy.run = counted
    try:
        q, k, v, grad, _ = _inputs("gqa", world, "zigzag", torch.float64, seed=1)
        local = [shard(t, world, rank, "zigzag").requires_grad_() for t in (q, k, v)]
        out = attend(*local, _mechanism("retention"), pattern="noncausal_self", strategy="lasp2", layout="zigzag")
        with CommDebugMode() as mode:
            out.backward(shard(grad, world, rank, "zigzag"))
        counts.update({f"backward {op}": n for op, n in mode.get_comm_counts().items()})
    finally:
        strategy.run = original
    return counts


def _refusals(rank, world) -> dict[str, str]:
    """Errors every rank must raise the same way."""
    out = {}
    q, k, v, _, _ = _inputs("gqa", world, "contiguous", torch.float64, seed=2)
    local = [shard(t, world, rank, "contiguous") for t in (q, k, v)]
    try:  # positions reach 23 > max_len 16 only on the last rank: every rank checks the WHOLE sequence
        attend(*local, "cosformer", pattern="causal_self", strategy="lasp2", layout="contiguous", max_len=16)
    except InvalidOption as err:
        out["cosformer max_len"] = str(err)
    try:  # random features drawn from each rank's own generator: refused, never silently different
        torch.manual_seed(rank)
        attend(*local, "performer", pattern="causal_self", strategy="lasp2", layout="contiguous")
    except InvalidOption as err:
        out["performer seeds"] = str(err)
    try:
        attend(*local, "softmax", pattern="causal_self", strategy="lasp2", layout="contiguous")
    except InvalidOption as err:
        out["softmax"] = str(err)
    return out


# every mechanism in both patterns and layouts, the variants taking turns (each mechanism meets every variant);
# fp32 on the zigzag layout with padding
CASES = [
    (name, pattern, layout, VARIANTS[i % len(VARIANTS)], "fp64")
    for i, (name, pattern, layout) in enumerate(itertools.product(MECHANISMS, PATTERNS, LAYOUTS))
] + [(name, "causal_self" if i % 2 else "noncausal_self", "zigzag", "gqa+padding", "fp32") for i, name in
     enumerate(MECHANISMS)]  # fmt: skip


def _all_cases(rank: int, world: int) -> dict:
    torch.manual_seed(0)
    results = {}
    for case in CASES:
        name, pattern, layout, variant, precision = case
        dtype = torch.float64 if precision == "fp64" else torch.float32
        results[case] = _one_case(rank, world, name, pattern, layout, variant, dtype)
    results["parameters"] = _parameter_gradients(rank, world)
    results["comm"] = _comm_counts(rank, world) if world > 1 else {}
    results["refusals"] = _refusals(rank, world)
    return results


@pytest.fixture(scope="module", params=[1, 2, 3, 4], ids=lambda w: f"W{w}")
def world_results(request):
    return run_world(request.param, _all_cases)


def test_every_case_matches_one_process_on_every_rank(world_results):
    world, per_rank = world_results
    bad = mismatches(CASES, per_rank)
    assert not bad, f"W={world}: {len(bad)} of {len(CASES)} cases differ from one process: {bad[:5]}"


def test_trainable_feature_map_gradients_of_the_ranks_add_up_to_one_process(world_results):
    world, per_rank = world_results
    want = per_rank[0]["parameters"]["one process"]
    summed = [sum(r["parameters"]["mine"][i] for r in per_rank) for i in range(len(want))]
    assert want and all(_error(a, b) <= 1e-10 for a, b in zip(summed, want, strict=True))


def test_one_all_gather_forward_and_one_reduce_scatter_backward(world_results):
    world, per_rank = world_results
    if world == 1:
        pytest.skip("no collectives with one rank")
    for counts in (r["comm"] for r in per_rank):
        forward = {op: n for op, n in counts.items() if op.startswith("forward")}
        backward = {op: n for op, n in counts.items() if op.startswith("backward")}
        assert list(forward.values()) == [1] and "allgather" in next(iter(forward)), counts
        assert list(backward.values()) == [1] and "reduce_scatter" in next(iter(backward)), counts


def test_refusals_are_clear_on_every_rank(world_results):
    world, per_rank = world_results
    for r in per_rank:
        assert "max_len=16" in r["refusals"]["cosformer max_len"]
        assert "lasp2" in r["refusals"]["softmax"] and "softmax" in r["refusals"]["softmax"]
        if world > 1:
            assert "same seed" in r["refusals"]["performer seeds"]
