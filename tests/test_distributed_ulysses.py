"""The ulysses strategy: forward and q/k/v gradients equal one process, over real gloo ranks (W = 2, 3, 4; W = 1
in this process), for several mechanisms, both patterns and layouts, GQA and key padding; its collective counts;
its refusals; and the heads_independent audit it relies on."""

from __future__ import annotations

import itertools
import zlib

import pytest
import torch

import attnkit
from attnkit.distributed import attend, choose, launch, shard
from attnkit.errors import InvalidOption
from attnkit.mechanism import REGISTRY
from attnkit.patterns import Pattern, as_pattern

B, D = 2, 8
T = 24  # splits zigzag (2W chunks) and contiguous for every W in 1..4
MECHS = {  # name -> options
    "softmax": {},
    "sigmoid": {},
    "linear": {},
    "sliding_window": {"window": 5},
    "combiner": {"block": 4},
    "nystrom": {"num_landmarks": 4},
}
PADDINGS = ("none", "random", "shard")  # shard: the last rank's whole shard is padding


def _cases() -> list[dict]:
    out = []
    for (name, opts), pat, layout, pad in itertools.product(
        MECHS.items(), ("noncausal_self", "causal_self"), ("zigzag", "contiguous"), PADDINGS
    ):
        if as_pattern(pat) in REGISTRY.get(name).patterns:
            out.append(dict(name=name, opts=opts, pattern=pat, layout=layout, pad=pad, dtype=torch.float64, gqa=True))
    # fp32, and query heads = kv heads (no GQA)
    out.append(dict(name="softmax", opts={}, pattern="causal_self", layout="zigzag", pad="random",
                    dtype=torch.float32, gqa=True))  # fmt: skip
    out.append(dict(name="linear", opts={}, pattern="causal_self", layout="zigzag", pad="none",
                    dtype=torch.float64, gqa=False))  # fmt: skip
    return out


def case_id(c: dict) -> str:
    return f"{c['name']}-{c['pattern']}-{c['layout']}-{c['pad']}-{str(c['dtype'])[6:]}-{'gqa' if c['gqa'] else 'mha'}"


CASES = _cases()


def cases_for(world: int) -> list[dict]:
    """Every case for W = 1, 2; for W = 3, 4 (slow to spawn on two cores) the hardest padding only."""
    return CASES if world <= 2 else [c for c in CASES if c["pad"] == "shard" or c["dtype"] != torch.float64]


def _inputs(case: dict, world: int):
    """The full tensors, the same on every rank (seeded): q, k, v, the output's cotangent, the key padding mask."""
    gen = torch.Generator().manual_seed(zlib.crc32(case_id(case).encode()))  # not hash(): salted per process
    hkv = world
    hq = 2 * hkv if case["gqa"] else hkv
    dt = case["dtype"]
    q, k, v = (torch.randn(B, T, h, D, generator=gen, dtype=dt) for h in (hq, hkv, hkv))
    g = torch.randn(B, T, hq, D, generator=gen, dtype=dt)
    mask = None
    if case["pad"] != "none":
        mask = torch.rand(B, T, generator=gen) > 0.3
        if case["pad"] == "shard":
            w = max(world, 2)  # one rank alone: pad what the last of two ranks would hold, not everything
            mask[:, shard(torch.arange(T), w, w - 1, case["layout"], dim=0)] = False
    return q, k, v, g, mask


def _max_error(rank: int, world: int, case: dict) -> float:
    q, k, v, g, mask = _inputs(case, world)
    mech = attnkit.create(case["name"], heads=q.shape[2], head_dim=D, **case["opts"])
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    out = mech(*full, pattern=case["pattern"], key_padding_mask=mask)
    (out * g).sum().backward()

    def cut(t):
        return shard(t, world, rank, case["layout"])

    local = [cut(t).clone().requires_grad_() for t in (q, k, v)]
    kpm = None if mask is None else cut(mask)
    mine = attend(*local, mech, pattern=case["pattern"], strategy="ulysses", layout=case["layout"],
                  key_padding_mask=kpm, timeout=30)  # fmt: skip
    (mine * cut(g)).sum().backward()
    pairs = [(mine, out), *((lo.grad, fu.grad) for lo, fu in zip(local, full, strict=True))]
    return max((a - cut(b)).abs().max().item() for a, b in pairs)


def _comm_counts(rank: int, world: int) -> dict[str, int]:
    """Collectives of one padded call, forward then backward, as CommDebugMode counts them."""
    from torch.distributed.tensor.debug import CommDebugMode

    case = dict(name="softmax", opts={}, pattern="causal_self", layout="zigzag", pad="random", dtype=torch.float64,
                gqa=True)  # fmt: skip
    q, k, v, g, mask = _inputs(case, world)
    local = [shard(t, world, rank).requires_grad_() for t in (q, k, v)]
    counts = {}
    with CommDebugMode() as fwd:
        out = attend(*local, "softmax", pattern="causal_self", strategy="ulysses", key_padding_mask=shard(mask, world,
                     rank))  # fmt: skip
    with CommDebugMode() as bwd:
        (out * shard(g, world, rank)).sum().backward()
    for label, mode in (("fwd", fwd), ("bwd", bwd)):
        for op, n in mode.get_comm_counts().items():
            counts[f"{label}:{str(op).removeprefix('c10d.').removesuffix('.default')}"] = n
    return counts


def _string_mechanism_error(rank: int, world: int) -> float:
    """The mechanism given by name (built on every rank) rather than as a module."""
    case = dict(name="sigmoid", opts={}, pattern="noncausal_self", layout="contiguous", pad="none",
                dtype=torch.float64, gqa=True)  # fmt: skip
    q, k, v, _, _ = _inputs(case, world)
    ref = attnkit.create("sigmoid")(q, k, v, pattern="noncausal_self")
    mine = attend(*(shard(t, world, rank, "contiguous") for t in (q, k, v)), "sigmoid", pattern="noncausal_self",
                  strategy="ulysses", layout="contiguous")  # fmt: skip
    return (mine - shard(ref, world, rank, "contiguous")).abs().max().item()


def _on_ranks(rank: int, world: int) -> dict:
    errors = {case_id(c): _max_error(rank, world, c) for c in cases_for(world)}
    errors["by-name"] = _string_mechanism_error(rank, world)
    return {"errors": errors, "comm": _comm_counts(rank, world)}


WORLDS = (1, 2, 3, 4)
_results: dict[int, list[dict]] = {}  # one spawn per world size, shared by every test of it


def ranks(world: int) -> list[dict]:
    if world not in _results:
        if world == 1:  # no process group: attend runs as one rank
            _results[world] = [{"errors": {case_id(c): _max_error(0, 1, c) for c in cases_for(1)}}]
        else:
            _results[world] = launch.run(world, _on_ranks, timeout=240, collective_timeout=60)
    return _results[world]


@pytest.mark.parametrize("world, case", [(w, c) for w in WORLDS for c in cases_for(w)],
                         ids=[f"W{w}-{case_id(c)}" for w in WORLDS for c in cases_for(w)])  # fmt: skip
def test_ulysses_equals_one_process_forward_and_gradients(world, case):
    tol = 1e-10 if case["dtype"] == torch.float64 else 2e-5
    errors = [r["errors"][case_id(case)] for r in ranks(world)]
    assert max(errors) < tol, f"W={world} {case_id(case)}: per-rank max errors {errors}"


@pytest.mark.parametrize("world", WORLDS[1:])
def test_ulysses_takes_a_mechanism_by_name(world):
    assert max(r["errors"]["by-name"] for r in ranks(world)) < 1e-12


@pytest.mark.parametrize("world", WORLDS[1:])
def test_ulysses_collectives_are_four_all_to_alls_each_way(world):
    for r in ranks(world):
        # forward: q, k, v and the output; the size check and the padding mask are all-gathers
        assert r["comm"].get("fwd:alltoall_base_") == 4, r["comm"]
        assert r["comm"].get("fwd:_allgather_base_") == 2, r["comm"]
        assert r["comm"].get("bwd:alltoall_base_") == 4, r["comm"]  # the output's gradient, then dq, dk, dv
        assert "bwd:_allgather_base_" not in r["comm"], r["comm"]


@pytest.mark.parametrize(
    "name, options, why",
    [
        ("retention", {}, "heads are not independent: a decay per head index"),
        ("lightning", {}, "heads are not independent: a decay per head index"),
        ("performer", {"seed": 1}, "heads are not independent: random draws"),
        ("dilated", {}, "heads are not independent: dilated does not declare"),
        ("sqa", {}, "heads are not independent"),
        ("complex", {}, "trainable"),
    ],
)
def test_ulysses_refuses_mechanisms_whose_heads_are_coupled(name, options, why):
    mech = attnkit.create(name, heads=4, head_dim=D, **options)
    with pytest.raises(InvalidOption, match=why):
        choose(mech, Pattern.CAUSAL_SELF, "ulysses", layout="zigzag", world=2, total=64, heads=4, kv_heads=2)


def test_ulysses_refuses_heads_not_divisible_by_the_world():
    mech = attnkit.create("softmax")
    with pytest.raises(InvalidOption, match="divisible by W=4; got 6 and 3"):
        choose(mech, Pattern.CAUSAL_SELF, "ulysses", layout="zigzag", world=4, total=64, heads=6, kv_heads=3)
    assert (
        choose(mech, Pattern.CAUSAL_SELF, "ulysses", layout="zigzag", world=3, total=60, heads=6, kv_heads=3).name
        == "ulysses"
    )


def _independent() -> list[tuple[str, str]]:
    out = []
    for name in REGISTRY.names():
        cls = REGISTRY.get(name)
        if cls.heads_independent:
            out += [(name, p.value) for p in (Pattern.NONCAUSAL_SELF, Pattern.CAUSAL_SELF) if p in cls.patterns]
    return out


def test_the_audit_marks_the_mechanisms_ulysses_is_tested_with():
    marked = {name for name, _ in _independent()}
    assert set(MECHS) <= marked
    assert not {"retention", "lightning", "dilated", "sqa", "moh", "performer", "block_sparse"} & marked


@pytest.mark.parametrize("name, pattern", _independent())
def test_a_heads_independent_mechanism_gives_each_head_subset_its_own_outputs(name, pattern):
    """What heads_independent promises: running kv head group r with its query heads gives those heads' outputs."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(B, 20, h, D, generator=gen, dtype=torch.float64) for h in (4, 2, 2))
    mask = torch.rand(B, 20, generator=gen) > 0.25
    mech = attnkit.create(name, heads=4, head_dim=D)
    full = mech(q, k, v, pattern=pattern, key_padding_mask=mask)
    for r in range(2):
        part = mech(q[:, :, 2 * r : 2 * r + 2], k[:, :, r : r + 1], v[:, :, r : r + 1], pattern=pattern,
                    key_padding_mask=mask)  # fmt: skip
        torch.testing.assert_close(part, full[:, :, 2 * r : 2 * r + 2], rtol=0, atol=1e-12)
