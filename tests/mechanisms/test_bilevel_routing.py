"""bilevel_routing: region routing checked by a loop (1-D and on a grid), all regions give softmax, no leak,
no [T, T]; the grid form's edge regions, padding, options and flops."""

from __future__ import annotations

import pytest
import torch
from largest_tensor import largest_tensor
from topk_helpers import future_changes_nothing, largest_call_tensor, softmax_over

import attnkit
from attnkit.errors import InvalidOption, ShapeError, UnsupportedPattern
from attnkit.mechanism import Shape
from attnkit.ops.grid_regions import from_regions, region_of_token, to_regions
from attnkit.patterns import Pattern
from attnkit.testing import assert_close, make_qkv

PATHS = ("reference", "routed")


def region_loop(q, k, v, region, topk, causal):
    """Noncausal: region means route query regions; causal: each token against completed regions + its own."""
    b, t, h, _ = q.shape
    n = -(-t // region)
    spans = [range(c * region, min((c + 1) * region, t)) for c in range(n)]
    allowed = torch.zeros(b, h, t, t, dtype=torch.bool)
    for bi in range(b):
        for hi in range(h):
            k_mean = [k[bi, list(s), hi].double().mean(0) for s in spans]
            for i in range(t):
                own = i // region
                if causal:
                    cands = range(own)
                    aff = [q[bi, i, hi].double() @ k_mean[c] for c in cands]
                else:
                    cands = range(n)
                    q_mean = q[bi, list(spans[own]), hi].double().mean(0)
                    aff = [q_mean @ k_mean[c] for c in cands]
                chosen = sorted(cands, key=lambda c: (aff[c], c), reverse=True)[:topk]
                for c in [*chosen, own] if causal else chosen:
                    allowed[bi, hi, i, list(spans[c])] = True
                if causal:
                    allowed[bi, hi, i, i + 1 :] = False
    return softmax_over(q, k, v, allowed)


@pytest.mark.parametrize("pattern", ["causal_self", "noncausal_self"])
@pytest.mark.parametrize("path", PATHS)
def test_routing_matches_a_loop(pattern, path):
    q, k, v = make_qkv(1, 22, 22, 2, 2, 8, dtype=torch.float64)
    mech = attnkit.create("bilevel_routing", region=4, topk=2)
    expected = region_loop(q, k, v, 4, 2, pattern == "causal_self")
    assert_close(path, expected, mech(q, k, v, pattern=pattern, path=path), 1e-9)


@pytest.mark.parametrize("pattern", ["causal_self", "noncausal_self"])
@pytest.mark.parametrize("path", PATHS)
def test_every_region_routed_is_softmax(pattern, path):
    q, k, v = make_qkv(2, 37, 37, 4, 2, 16, dtype=torch.float64)
    mech = attnkit.create("bilevel_routing", region=4, topk=10)
    expected = attnkit.create("softmax")(q, k, v, pattern=pattern)
    assert_close(path, expected, mech(q, k, v, pattern=pattern, path=path), 1e-9)


@pytest.mark.parametrize("path", PATHS)
def test_no_causal_leak(path):
    future_changes_nothing(attnkit.create("bilevel_routing", region=4, topk=2), path)


@pytest.mark.parametrize("pattern", ["causal_self", "noncausal_self"])
def test_routed_path_never_builds_t_by_t(pattern):
    t = 512
    q, k, v = make_qkv(1, t, t, 1, 1, 16)
    mech = attnkit.create("bilevel_routing", region=32, topk=2)
    assert largest_call_tensor(mech, q, k, v, pattern, "routed") < t * t // 2


@pytest.mark.parametrize("bad", [0, -1, 2**70, 1.5, "4", True])
@pytest.mark.parametrize("name", ["region", "topk", "region_side"])
def test_options_are_validated(name, bad):
    with pytest.raises(InvalidOption, match=name):
        attnkit.create("bilevel_routing", **{name: bad})


# ---- the grid form: BiFormer's square regions on a 2-D map ------------------------------------------------


def grid_region_loop(q, k, v, grid, side, topk, kpm=None):
    """Per query, in fp64: its square region from its (row, col); region means over the region's real cells;
    the top-k key regions that hold a real key (ties: the later region); softmax over their real keys."""
    b, t, h, _ = q.shape
    rows, cols = grid
    per_row = -(-cols // side)
    region_of = [(i // cols) // side * per_row + (i % cols) // side for i in range(t)]
    n = max(region_of) + 1
    real = torch.ones(b, t, dtype=torch.bool) if kpm is None else kpm
    allowed = torch.zeros(b, h, t, t, dtype=torch.bool)
    for bi in range(b):
        members = [[i for i in range(t) if region_of[i] == r and real[bi, i]] for r in range(n)]
        for hi in range(h):
            q_mean = [q[bi, m, hi].double().mean(0) if m else torch.zeros(q.shape[-1]).double() for m in members]
            k_mean = {r: k[bi, m, hi].double().mean(0) for r, m in enumerate(members) if m}
            for i in range(t):
                aff = {c: float(q_mean[region_of[i]] @ km) for c, km in k_mean.items()}
                for c in sorted(aff, key=lambda c: (aff[c], c), reverse=True)[:topk]:
                    allowed[bi, hi, i, members[c]] = True
    return softmax_over(q, k, v, allowed)


@pytest.mark.parametrize("padded", [False, True], ids=["dense", "padded"])
@pytest.mark.parametrize(("grid", "side", "topk"), [((6, 8), 2, 3), ((5, 7), 3, 2), ((7, 4), 2, 1), ((1, 9), 2, 2)])
@pytest.mark.parametrize("path", PATHS)
def test_grid_routing_matches_a_loop(path, grid, side, topk, padded):
    t = grid[0] * grid[1]
    q, k, v = make_qkv(2, t, t, 2, 2, 8, dtype=torch.float64)
    kpm = torch.rand(2, t, generator=torch.Generator().manual_seed(1)) > 0.3 if padded else None
    mech = attnkit.create("bilevel_routing", region=side * side, topk=topk)
    expected = grid_region_loop(q, k, v, grid, side, topk, kpm)
    got = mech(q, k, v, pattern="noncausal_self", spatial_shape=grid, key_padding_mask=kpm, path=path)
    assert_close(path, expected, got, 1e-9)


@pytest.mark.parametrize("path", PATHS)
def test_grid_edge_regions_are_partial_not_padded_with_zeros(path):
    """A 5 x 7 map with 3 x 3 regions equals the 6 x 9 map holding it whose extra cells are padding: the edge
    regions' means are over the cells they have (zero cells would pull the means towards 0)."""
    q, k, v = make_qkv(1, 35, 35, 2, 2, 8, dtype=torch.float64)
    mech = attnkit.create("bilevel_routing", region=9, topk=2)
    out = mech(q, k, v, pattern="noncausal_self", spatial_shape=(5, 7), path=path)

    def embed(t):  # the 5 x 7 map in the top-left corner of a 6 x 9 one, zeros around it
        big = torch.zeros(1, 6, 9, *t.shape[2:], dtype=t.dtype)
        big[:, :5, :7] = t.view(1, 5, 7, *t.shape[2:])
        return big.flatten(1, 2)

    inside = embed(torch.ones(1, 35, dtype=torch.bool))
    big = mech(embed(q), embed(k), embed(v), pattern="noncausal_self", spatial_shape=(6, 9), key_padding_mask=inside)
    assert_close(path, out, big[:, inside[0]], 1e-9)
    # and the routing is not the one zero-filled edge cells give (the check can fail)
    zero_filled = mech(embed(q), embed(k), embed(v), pattern="noncausal_self", spatial_shape=(6, 9), path=path)
    assert not torch.allclose(out, zero_filled[:, inside[0]])


@pytest.mark.parametrize("path", PATHS)
def test_grid_every_region_routed_is_softmax(path):
    q, k, v = make_qkv(2, 63, 63, 4, 2, 16, dtype=torch.float64)
    kpm = torch.rand(2, 63, generator=torch.Generator().manual_seed(2)) > 0.4
    mech = attnkit.create("bilevel_routing", region=4, topk=20)  # 2 x 2 regions of a 7 x 9 map: 4 x 5 = 20
    expected = attnkit.create("softmax")(q, k, v, pattern="noncausal_self", key_padding_mask=kpm)
    got = mech(q, k, v, pattern="noncausal_self", spatial_shape=(7, 9), key_padding_mask=kpm, path=path)
    assert_close(path, expected, got, 1e-9)


@pytest.mark.parametrize("path", PATHS)
def test_grid_region_without_real_keys_is_never_routed(path):
    """Two fully padded regions leave 18 with real keys: top-18 routing then sees every real key (softmax). A
    padded region's mean (0) would beat every region of negative affinity if it could be routed to."""
    q, k, v = make_qkv(1, 63, 63, 2, 2, 8, dtype=torch.float64)
    region_of = region_of_token((7, 9), (2, 2))
    kpm = ((region_of != 3) & (region_of != 12))[None]
    mech = attnkit.create("bilevel_routing", region=4, topk=18)
    expected = attnkit.create("softmax")(q, k, v, pattern="noncausal_self", key_padding_mask=kpm)
    got = mech(q, k, v, pattern="noncausal_self", spatial_shape=(7, 9), key_padding_mask=kpm, path=path)
    assert_close(path, expected, got, 1e-9)


def test_grid_region_side_longer_than_the_map_covers_it():
    q, k, v = make_qkv(1, 12, 12, 2, 2, 8, dtype=torch.float64)
    wide = attnkit.create("bilevel_routing", region=4, region_side=50, topk=1)(
        q, k, v, pattern="noncausal_self", spatial_shape=(3, 4)
    )
    assert_close("one region", attnkit.create("softmax")(q, k, v, pattern="noncausal_self"), wide, 1e-9)


def test_a_one_axis_grid_is_the_sequence_form():
    q, k, v = make_qkv(1, 30, 30, 2, 2, 8)
    mech = attnkit.create("bilevel_routing", region=4, topk=2)
    assert torch.equal(mech(q, k, v, pattern="causal_self"), mech(q, k, v, pattern="causal_self", spatial_shape=(30,)))


def test_grid_form_is_refused_outside_2d_noncausal_self():
    q, k, v = make_qkv(1, 24, 24, 2, 2, 8)
    mech = attnkit.create("bilevel_routing", region=4, topk=2)
    with pytest.raises(UnsupportedPattern, match="noncausal_self"):
        mech(q, k, v, pattern="causal_self", spatial_shape=(4, 6))
    with pytest.raises(ShapeError, match="2-D"):
        mech(q, k, v, pattern="noncausal_self", spatial_shape=(2, 3, 4))


@pytest.mark.parametrize(
    ("region", "side"), [(64, 8), (4, 2), (1, 1), (2, 1), (3, 2), (6, 2), (7, 3), (12, 3), (13, 4)]
)
def test_region_side_defaults_to_the_nearest_root(region, side):
    assert attnkit.create("bilevel_routing", region=region).options.side == side
    assert attnkit.create("bilevel_routing", region=region, region_side=5).options.side == 5


def test_grid_routed_path_never_builds_t_by_t():
    t = 32 * 32
    q, k, v = make_qkv(1, t, t, 1, 1, 16)
    mech = attnkit.create("bilevel_routing", region=16, topk=2)
    size, shape = largest_tensor(lambda: mech(q, k, v, pattern="noncausal_self", spatial_shape=(32, 32), path="routed"))
    ref, _ = largest_tensor(lambda: mech(q, k, v, pattern="noncausal_self", spatial_shape=(32, 32), path="reference"))
    assert ref >= t * t  # the check can see a T x T tensor
    assert size <= t * 2 * 16, f"largest tensor {shape}"


def test_region_layout_round_trips_and_matches_coordinates():
    t = torch.arange(2 * 35 * 3).view(2, 35, 3)
    slots = to_regions(t, (5, 7), (3, 2))  # 2 x 4 regions of 6 slots
    assert slots.shape == (2, 8 * 6, 3)
    assert torch.equal(from_regions(slots, (5, 7), (3, 2)), t)
    real = to_regions(torch.ones(1, 35, dtype=torch.bool), (5, 7), (3, 2))
    assert int(real.sum()) == 35
    region_of = region_of_token((5, 7), (3, 2))
    token_at = to_regions(torch.arange(35)[None], (5, 7), (3, 2))[0]  # token in each slot (0 at edge slots)
    assert torch.equal(region_of[token_at[real[0]]], torch.arange(48)[real[0]] // 6)


def test_grid_flops_count_on_the_calls_map():
    mech = attnkit.create("bilevel_routing", region=9, topk=2)
    on_map = Shape(1, 63, 63, 2, 2, 16, 16, grid=(7, 9))  # 3 x 3 regions of a 7 x 9 map: 3 x 3 = 9 of them
    assert mech.flops(on_map, Pattern.NONCAUSAL_SELF) == 2 * (2.0 * 9 * 9 * 16 + 2.0 * 63 * 18 * 32)
    strip = Shape(1, 64, 64, 2, 2, 16, 16, grid=(2, 32))  # 2 x 3 regions (the axis is shorter): 11 of them
    assert mech.flops(strip, Pattern.NONCAUSAL_SELF) == 2 * (2.0 * 11 * 11 * 16 + 2.0 * 64 * 12 * 32)
    sequence = Shape(1, 63, 63, 2, 2, 16, 16)  # no grid: 7 regions of 9 tokens
    assert mech.flops(sequence, Pattern.NONCAUSAL_SELF) == 2 * (2.0 * 7 * 7 * 16 + 2.0 * 63 * 18 * 32)
