"""Helpers for testing mechanisms: the relative-RMSE check and the cases the conformance suite runs.

Everything here is derived from the registry, so a new mechanism is tested without new test code.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from .api import create
from .bench.inputs import make_qkv, paths_for, probe_inputs  # noqa: F401 - re-exported for tests
from .mechanism import REGISTRY, Mechanism
from .ops.spatial import squarest_grid
from .patterns import Pattern

log = logging.getLogger(__name__)

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


def rel_rmse(ref: torch.Tensor, out: torch.Tensor, floor: float = 0.0) -> float:
    """``||out - ref|| / max(||ref||, floor * sqrt(n))`` in fp64.

    ``floor`` is the RMS below which a reference counts as zero-sized: a gradient that is zero up to
    rounding (say, of a query with a single visible key) is then compared in absolute terms.
    """
    ref, out = ref.double(), out.double()
    denom = max(ref.norm().item(), floor * ref.numel() ** 0.5)
    diff = (out - ref).norm().item()
    return diff / denom if denom > 0 else diff


def assert_close(name: str, ref: torch.Tensor, out: torch.Tensor, ratio: float, floor: float = 1e-2) -> None:
    """Fail unless ``out`` has ``ref``'s shape, no NaN/inf, and relative RMSE <= ratio.

    The default ``floor`` suits unit-scale test inputs (outputs and gradients of order 0.1 to 1).
    """
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    err = rel_rmse(ref, out, floor)
    log.info("%16s rel-rmse %.3e (limit %.1e)", name, err, ratio)
    assert err <= ratio, f"{name}: relative RMSE {err:.3e} exceeds {ratio:.1e}"


def grid_for(t: int, dims: int) -> tuple[int, ...]:
    """The grid the suite lays ``t`` tokens on: ``grid_for(63, 2) == (7, 9)``, ``grid_for(7, 2) == (1, 7)``."""
    return squarest_grid(t, dims)


@dataclass(frozen=True)
class Case:
    """One mechanism configuration the conformance suite exercises (spatial ones on a grid of ``spatial_dims`` axes)."""

    mechanism: str
    options: dict[str, Any] = field(default_factory=dict)
    spatial_dims: int = 0  # 0: not spatial

    @property
    def label(self) -> str:
        label = self.mechanism
        if self.options:
            label += "[" + ",".join(f"{k}={v}" for k, v in sorted(self.options.items())) + "]"
        return label + (f"-{self.spatial_dims}d" if self.spatial_dims else "")

    def grid(self, t: int) -> tuple[int, ...] | None:
        """The spatial_shape the suite gives a call with ``t`` query tokens (None: not spatial, or no tokens)."""
        return grid_for(t, self.spatial_dims) if self.spatial_dims and t > 0 else None

    def build(self, heads: int, head_dim: int) -> Mechanism:
        torch.manual_seed(0)  # trainable mechanisms start from the same parameters every time
        mech = create(self.mechanism, heads=heads, head_dim=head_dim, **self.options)
        return SpatialCalls(mech, self) if self.spatial_dims else mech

    @property
    def cls(self) -> type[Mechanism]:
        return REGISTRY.get(self.mechanism)

    @property
    def patterns(self) -> frozenset[Pattern]:
        """The patterns this case runs: a sequence mechanism's grid form has its own (``grid_patterns``)."""
        cls = self.cls
        return cls.grid_patterns if self.spatial_dims and not cls.spatial else cls.patterns

    @property
    def decodes(self) -> bool:
        """The case decodes with state: a mechanism with a state kind, in a case whose patterns hold causal_self
        (a sequence mechanism's grid form may have none)."""
        return self.cls.state_kind is not None and Pattern.CAUSAL_SELF in self.patterns


class SpatialCalls:
    """A spatial mechanism whose calls get ``spatial_shape`` from the case's grid of the query length, unless
    the call passes one; everything else is the mechanism's own (``last_path``, ``tolerances``, ``init_state``)."""

    def __init__(self, mech: Mechanism, case: Case):
        self.mech, self.case = mech, case

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw: Any):
        if "spatial_shape" not in kw and q.dim() == 4:
            kw["spatial_shape"] = self.case.grid(q.shape[1])
        return self.mech(q, k, v, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.mech, name)


def cases(name: str = "*", *, kind: str = "attention") -> list[Case]:
    """Every registered mechanism with each of its example option sets."""
    out = []
    for n in REGISTRY.names(name):
        cls = REGISTRY.get(n)
        if cls.kind == kind:
            ranks = cls.spatial_dims if cls.spatial else (0, *cls.grid_dims)
            out.extend(Case(n, dict(opts), dims) for opts in cls.example_options for dims in ranks)
    return out


def pattern_path_grid(case_list: list[Case], device: str = "cpu") -> list[tuple[Case, Pattern, str]]:
    """(case, pattern, path) for every supported pattern and every fast path that takes it on ``device``."""
    grid = []
    for case in case_list:
        mech = case.build(2, 4)
        mech = getattr(mech, "mech", mech)  # a spatial case's mechanism itself
        for pattern in sorted(case.patterns, key=lambda p: p.value):
            grid.extend((case, pattern, p.name) for p in paths_for(case.cls, mech, pattern, device))
    return grid


def random_chunks(total: int, seed: int) -> list[int]:
    """Chunk sizes summing to ``total``, with several chunks of exactly 1 (decoding steps)."""
    g = torch.Generator().manual_seed(seed)
    sizes, left = [], total
    for i in itertools.count():
        if left == 0:
            break
        n = 1 if i % 3 == 1 else int(torch.randint(1, max(2, total // 3), (1,), generator=g))
        n = min(n, left)
        sizes.append(n)
        left -= n
    return sizes
