"""What the distributed strategy tests share: one spawn per world size running every case (each spawn costs
seconds), and the check that every case matches one process on every rank."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from attnkit.distributed import launch


def run_world(world: int, all_cases: Callable[[int, int], dict], timeout: float = 120) -> tuple[int, list[dict]]:
    """``(world, [rank 0's results, ...])`` of ``all_cases(rank, world)``; W = 1 runs in this process, with no
    process group (attend's single-process path), its random state restored after."""
    if world == 1:
        with torch.random.fork_rng():
            return world, [all_cases(0, 1)]
    return world, launch.run(world, all_cases, timeout=timeout)


def mismatches(cases: list[Any], per_rank: list[dict]) -> list[tuple[Any, list[float]]]:
    """The cases whose largest error over the ranks exceeds their tolerance (1e-10 in fp64, 2e-5 in fp32; the
    case's last field names its precision). NaN counts as a mismatch."""
    bad = []
    for case in cases:
        tol = 1e-10 if case[-1] == "fp64" else 2e-5
        errors = [r[case] for r in per_rank]
        if not max(errors) <= tol:
            bad.append((case, errors))
    return bad
