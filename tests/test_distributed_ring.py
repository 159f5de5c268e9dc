"""The ``ring`` strategy against one process: outputs and q/k/v gradients, W in {1, 2, 3, 4}, both layouts, causal and
noncausal, GQA, key padding (random, and a whole rank's shard), softmax / sliding_window / complex; its P2P and
collective counts; ``Attention(context_parallel=...)``. One spawn per W runs every case; the tests read its results."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from attnkit import Attention, create
from attnkit.distributed import attend, choose, launch, shard
from attnkit.distributed._common import BlockMask, block_backward, block_forward, merge
from attnkit.distributed.ring import TAG_DKV, TAG_KV, TRAFFIC, Ring, Visibility, plan_block
from attnkit.errors import InvalidOption, ShapeError
from attnkit.patterns import Pattern

T, B, D = 48, 2, 8
MECHS = {
    "softmax": {},
    "window5": {"window": 5},  # smaller than every shard's chunk
    "window20": {"window": 20},  # reaches over several ranks
    "complex": {},
}
PATTERNS = ("causal_self", "noncausal_self")
LAYOUTS = ("zigzag", "contiguous")
PADDINGS = ("none", "random", "rank")


def _cases(world: int | None = None):
    """(case id, settings): the fp64 matrix, then fp32 / MHA / Dv != Dk / auto checks. For W >= 3 (``world``) only
    one padding per (mechanism, pattern, layout), the paddings taking turns: every one still meets every W."""
    combos = [(m, p, lay) for m in MECHS for p in PATTERNS for lay in LAYOUTS]
    cases = [
        (f"{m}-{p}-{lay}-{pad}-fp64", dict(mech=m, pattern=p, layout=lay, padding=pad))
        for i, (m, p, lay) in enumerate(combos)
        for j, pad in enumerate(PADDINGS)
        if world is None or world <= 2 or j == i % len(PADDINGS)
    ]
    cases += [
        ("softmax-causal-zigzag-random-fp32", dict(mech="softmax", pattern="causal_self", padding="random",
                                                   dtype=torch.float32)),
        ("complex-noncausal-contiguous-fp32", dict(mech="complex", pattern="noncausal_self", layout="contiguous",
                                                   dtype=torch.float32)),
        ("softmax-causal-zigzag-mha", dict(mech="softmax", pattern="causal_self", kv_heads=4)),
        ("softmax-causal-zigzag-dv6-plain", dict(mech="softmax", pattern="causal_self", padding="random", dv=6)),
        ("softmax-causal-zigzag-auto", dict(mech="softmax", pattern="causal_self", strategy="auto")),
    ]  # fmt: skip
    return cases


def _key_mask(padding: str, world: int, layout: str, gen: torch.Generator) -> torch.Tensor | None:
    if padding == "none":
        return None
    if padding == "random":
        real = torch.rand(B, T, generator=gen, dtype=torch.float64) > 0.3
        real[:, 0] = False  # causal query 0 then sees no key at all: its output must be 0
        return real
    real = torch.ones(B, T, dtype=torch.bool)  # "rank": every key of rank (1 mod W) is padding
    real[:, shard(torch.arange(T), world, 1 % world, layout, dim=0)] = False
    return real


def _one_case(rank, world, group, seed, mech, pattern, layout="zigzag", padding="none", dtype=torch.float64,
              kv_heads=2, dv=D, strategy="ring"):  # fmt: skip
    """max |ring - one process| over out, dq, dk, dv of this rank's rows."""
    gen = torch.Generator().manual_seed(seed)
    hq = 4
    q = torch.randn(B, T, hq, D, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    k = torch.randn(B, T, kv_heads, D, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    v = torch.randn(B, T, kv_heads, dv, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    dout = torch.randn(B, T, hq, dv, generator=gen, dtype=torch.float64).to(dtype)
    real = _key_mask(padding, world, layout, gen)
    name = "sliding_window" if mech.startswith("window") else mech
    module = create(name, heads=hq, head_dim=D, **MECHS[mech]).to(dtype)
    ref = module(q, k, v, pattern=pattern, key_padding_mask=real, path="reference")
    want = [ref, *torch.autograd.grad(ref, (q, k, v), dout)]

    def local(t):
        return shard(t.detach(), world, rank, layout).requires_grad_()

    ql, kl, vl = local(q), local(k), local(v)
    mask = None if real is None else shard(real, world, rank, layout)
    out = attend(ql, kl, vl, module, pattern=pattern, group=group, layout=layout, key_padding_mask=mask,
                 strategy=strategy)  # fmt: skip
    got = [out, *torch.autograd.grad(out, (ql, kl, vl), shard(dout, world, rank, layout))]
    return max((g - shard(w, world, rank, layout)).abs().max().item() for g, w in zip(got, want, strict=True))


def _counts(rank, world, group):
    """Collectives (CommDebugMode) and ring exchanges of one causal forward and one backward."""
    from torch.distributed.tensor.debug import CommDebugMode

    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(B, T // world, h, D, generator=gen, dtype=torch.float64, requires_grad=True)
               for h in (4, 2, 2))  # fmt: skip
    counts = {}
    for phase in ("forward", "backward"):
        TRAFFIC.reset()
        with CommDebugMode() as comm:
            if phase == "forward":
                out = attend(q, k, v, "softmax", pattern="causal_self", group=group, strategy="ring")
            else:
                out.sum().backward()
        counts[phase] = dict(collectives=comm.get_total_counts(), exchanges=TRAFFIC.exchanges,
                             bytes=TRAFFIC.bytes_sent, by_tag=dict(TRAFFIC.by_tag))  # fmt: skip
    return counts


LAYER_CASES = {  # id: (mechanism, options, pattern, layout, key padding)
    "softmax-causal-zigzag": ("softmax", {}, "causal_self", "zigzag", False),
    "softmax-causal-contiguous": ("softmax", {}, "causal_self", "contiguous", False),
    "complex-noncausal-zigzag-padded": ("complex", {}, "noncausal_self", "zigzag", True),  # its weights too
    "window-causal-contiguous-padded": ("sliding_window", {"window": 7}, "causal_self", "contiguous", True),
}


def _layer_case(rank, world, group, case):
    """Attention(context_parallel=...) on this rank's shard vs the same layer on the whole sequence: the output rows
    and the weight gradients (each rank's contribution all-reduced), fp64, RoPE on global positions, GQA."""
    mech, options, pattern, layout, padded = LAYER_CASES[case]
    torch.manual_seed(3)
    kw = dict(dim=16, heads=4, kv_heads=2, rope=mech != "complex", mechanism=mech, pattern=pattern, **options)
    layer = Attention(**kw).double()
    cp = Attention(**kw, context_parallel=group or True, cp_layout=layout, cp_strategy="ring").double()
    cp.load_state_dict(layer.state_dict())
    x = torch.randn(B, T, 16, dtype=torch.float64)
    dy = torch.randn(B, T, 16, dtype=torch.float64)
    real = torch.rand(B, T) > 0.3 if padded else None
    y = layer(x, key_padding_mask=real)
    y.backward(dy)
    local_real = None if real is None else shard(real, world, rank, layout)
    y_cp = cp(shard(x, world, rank, layout), key_padding_mask=local_real)
    y_cp.backward(shard(dy, world, rank, layout))
    err = (y_cp - shard(y.detach(), world, rank, layout)).abs().max().item()
    for p_one, p_cp in zip(layer.parameters(), cp.parameters(), strict=True):
        grad = p_cp.grad.clone()
        if world > 1:
            dist.all_reduce(grad, group=group)  # what DDP does
        err = max(err, (grad - p_one.grad).abs().max().item())
    return err


def _run_all(rank, world, group=None):
    """Every check on this rank of a group of ``world`` ranks: {check id: max error (or counts)}."""
    results = {cid: _one_case(rank, world, group, seed, **kw) for seed, (cid, kw) in enumerate(_cases(world))}
    results["counts"] = _counts(rank, world, group)
    for case in LAYER_CASES:
        results[f"layer-{case}"] = _layer_case(rank, world, group, case)
    return results


def _run_worlds(rank, world):
    """In one spawn of 4 ranks: W = 2 and 3 on subgroups of the first ranks (group= and its rank numbering tested on
    the way), then W = 4 on the default group. Spawning costs seconds; this pays it once."""
    by_world = {}
    for w in range(2, world + 1):
        group = dist.new_group(list(range(w))) if w < world else None  # every rank takes part in creating it
        if rank < w:
            by_world[w] = _run_all(rank, w, group)
        dist.barrier()
    return by_world


_RESULTS: dict[int, list[dict]] = {}


def _results(world: int) -> list[dict]:
    """Every rank's results for W ranks (W = 1 runs in this process, without a process group)."""
    if not _RESULTS:
        _RESULTS[1] = [_run_all(0, 1)]
        spawned = launch.run(4, _run_worlds, timeout=240)
        for w in (2, 3, 4):
            _RESULTS[w] = [spawned[r][w] for r in range(w)]
    return _RESULTS[world]


WORLDS = (1, 2, 3, 4)


@pytest.mark.parametrize(("world", "case"), [(w, cid) for w in WORLDS for cid, _ in _cases(w)])
def test_ring_matches_one_process(world, case):
    tol = 2e-5 if case.endswith("fp32") else 1e-10
    errors = [r[case] for r in _results(world)]
    assert max(errors) < tol, f"{case} W={world}: max error per rank {errors}"


@pytest.mark.parametrize("world", WORLDS)
def test_ring_rotates_kv_w_minus_1_times_forward_and_brings_dkv_home(world):
    for counts in (r["counts"] for r in _results(world)):
        fwd, bwd = counts["forward"], counts["backward"]
        assert fwd["exchanges"] == world - 1 and fwd["by_tag"].get(TAG_KV, 0) == world - 1
        # backward: K/V again (W - 1 hops) and dK/dV with them, W hops to come home
        assert bwd["by_tag"].get(TAG_KV, 0) == world - 1 and bwd["by_tag"].get(TAG_DKV, 0) == (
            world if world > 1 else 0
        )
        n = T // world
        assert fwd["bytes"] == (world - 1) * B * 2 * n * (D + D) * 8  # fp64 K and V of 2 kv heads per hop
        # collectives: attend's shape check and the ring's one gather of the key mask; none in backward
        assert fwd["collectives"] == (2 if world > 1 else 0) and bwd["collectives"] == 0


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("case", LAYER_CASES)
def test_attention_layer_with_context_parallel_equals_one_process(world, case):
    errors = [r[f"layer-{case}"] for r in _results(world)]
    assert max(errors) < 1e-10, errors


# ---- without processes ------------------------------------------------------------------------------------------


def test_auto_picks_ring_for_softmax_and_ring_refuses_other_families_by_name():
    sizes = dict(layout="zigzag", world=2, total=64, heads=4, kv_heads=2)
    assert choose(create("softmax"), Pattern.CAUSAL_SELF, "auto", **sizes).name == "ring"
    why = Ring().refuses(create("gaussian", heads=4, head_dim=8), Pattern.CAUSAL_SELF, **sizes)
    assert "mean and variance" in why and "softmax, sliding_window, complex" in why
    assert "not softmax attention" in Ring().refuses(create("linear"), Pattern.CAUSAL_SELF, **sizes)
    q = torch.randn(1, 8, 2, 4)
    with pytest.raises(InvalidOption, match="ring.? cannot run linear"):
        attend(q, q, q, "linear", pattern="causal_self", strategy="ring")


def test_zigzag_plan_balances_causal_work_and_contiguous_skips_later_ranks():
    from attnkit.distributed import positions

    vis = Visibility(causal=True)
    w = 4
    pos = [positions(32, w, r, "zigzag") for r in range(w)]
    for r in range(w):
        sizes = []
        for s in range(w):
            blk = plan_block(vis, pos[r], pos[(r - s) % w])
            sizes.append((blk.rows.stop - blk.rows.start) * (blk.cols.stop - blk.cols.start))
            assert blk.kind == ("causal" if s == 0 else "full")
        assert sizes == [64] + [32] * (w - 1)  # 2c x 2c causal, then c x 2c or 2c x c: the same on every rank
    cont = [positions(32, w, r, "contiguous") for r in range(w)]
    assert [plan_block(vis, cont[2], cont[(2 - s) % w]) is None for s in range(w)] == [False, False, False, True]


def test_merge_of_blocks_equals_attention_over_all_keys_with_queries_that_see_nothing():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 10, 8, generator=gen, dtype=torch.float64) for h in (4, 2, 2))
    real = torch.rand(2, 10, generator=gen) > 0.4
    real[:, :4] = False  # the first block has no real key: its rows give lse -inf, which the merge must ignore
    out = torch.zeros(2, 4, 10, 8, dtype=torch.float64)
    lse = torch.full((2, 4, 10), -math.inf, dtype=torch.float64)
    for cols in (slice(0, 4), slice(4, 10)):
        b_out, b_lse = block_forward(q, k[:, :, cols], v[:, :, cols], BlockMask(keys=real[:, cols]), 0.3)
        out, lse = merge(out, lse, b_out, b_lse)
    whole, whole_lse = block_forward(q, k, v, BlockMask(keys=real), 0.3)
    assert (out - whole).abs().max() < 1e-14 and (lse - whole_lse).abs().max() < 1e-13
    none_real = BlockMask(keys=torch.zeros(2, 10, dtype=torch.bool))
    b_out, b_lse = block_forward(q, k, v, none_real, 0.3)
    assert torch.isneginf(b_lse).all() and not b_out.any()
    grads = block_backward(torch.ones_like(b_out), q, k, v, b_out, b_lse, none_real, 0.3)
    assert all(torch.isfinite(g).all() and not g.any() for g in grads)


def test_lengths_the_layout_cannot_split_are_refused_and_bf16_merges_in_fp32():
    q = torch.randn(1, 7, 2, 4)
    with pytest.raises(ShapeError, match="multiple of 2"):
        attend(q, q, q, "softmax", pattern="causal_self", layout="zigzag")  # W = 1: zigzag cuts T into 2 chunks
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 64, h, 16, generator=gen, dtype=torch.float64) for h in (4, 2, 2))
    want = create("softmax")(q, k, v, pattern="causal_self", path="reference")
    got = attend(q.bfloat16(), k.bfloat16(), v.bfloat16(), "softmax", pattern="causal_self", strategy="ring")
    assert got.dtype == torch.bfloat16 and (got.double() - want).abs().max() < 3e-2


def test_context_parallel_layer_refuses_decoding_state_and_cross_patterns():
    layer = Attention(8, 2, context_parallel=True)
    with pytest.raises(InvalidOption, match="decoding state"):
        layer(torch.randn(1, 4, 8), return_state=True)
    with pytest.raises(InvalidOption, match="self pattern"):
        Attention(8, 2, pattern="noncausal_cross", context_parallel=True)
