"""Layouts of a sequence over W ranks: pure index functions, and unshard (all-gather) inverting shard."""

from __future__ import annotations

import pytest
import torch

from attnkit.distributed import launch
from attnkit.distributed.layout import order, padded_length, positions, shard, unshard
from attnkit.errors import InvalidOption, ShapeError


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_order_is_a_permutation_and_positions_are_its_slices(world, layout):
    total = 24
    perm = order(total, world, layout)
    assert sorted(perm.tolist()) == list(range(total))
    assert torch.equal(torch.cat([positions(total, world, r, layout) for r in range(world)]), perm)


def test_zigzag_gives_rank_r_chunks_r_and_2w_minus_1_minus_r():
    assert positions(16, 4, 0, "zigzag").tolist() == [0, 1, 14, 15]
    assert positions(16, 4, 3, "zigzag").tolist() == [6, 7, 8, 9]


def test_lengths_the_layout_cannot_split_are_refused_with_the_padding_to_use():
    with pytest.raises(ShapeError, match="Pad it to 12"):
        order(10, 3, "zigzag")
    assert padded_length(10, 3, "zigzag") == 12 and padded_length(10, 3, "contiguous") == 12
    assert padded_length(12, 3, "contiguous") == 12
    with pytest.raises(InvalidOption, match="layout"):
        order(12, 3, "stripe")


def _unshard_on_ranks(rank, world):
    full = torch.arange(2 * 24 * 3, dtype=torch.float64).view(2, 24, 3)
    out = {}
    for layout in ("zigzag", "contiguous"):
        out[layout] = torch.equal(unshard(shard(full, world, rank, layout), layout=layout), full)
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_unshard_inverts_shard_over_real_processes(world):
    results = launch.run(world, _unshard_on_ranks, timeout=60)
    assert results == [{"zigzag": True, "contiguous": True}] * world
