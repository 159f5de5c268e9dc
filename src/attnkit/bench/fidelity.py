"""How far each mechanism's output is from exact softmax attention (no training involved).

For T, a temperature tau that scales q (tau > 1: peaked attention, tau < 1: flat), random or
clustered inputs, and each value of the mechanism's knob (window, features...): the relative error
``||out - softmax(q k^T / sqrt(d)) v|| / ||softmax(...) v||``. Every mechanism except softmax itself
is measured, exact-sparse ones too: their distance from full attention is the point of the figure.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch

from ..api import attend, create
from ..mechanism import REGISTRY
from ..patterns import Pattern
from .case import SEED, BenchCase, Budget
from .cases import check_request, select_mechanisms
from .speed import square_grid

TEMPERATURES = (0.5, 1.0, 2.0)
INPUTS = ("random", "clustered")


@dataclass(frozen=True)
class FidelityCase(BenchCase):
    """Error of one mechanism against exact softmax: computed in the sweep's process (nothing is timed)."""

    isolated: ClassVar[bool] = False
    timed: ClassVar[bool] = False
    kind: ClassVar[str] = "fidelity"

    mechanism: str
    pattern: str
    tokens: int
    temperature: float
    inputs: str
    options: tuple[tuple[str, object], ...]
    heads: int = 4
    head_dim: int = 64

    def key(self, device_name: str, threads: int = 0) -> str:
        # threads change no error: a figure from any thread count counts
        return json.dumps({"kind": "fidelity", **asdict(self), "device_name": device_name}, sort_keys=True)

    @property
    def series(self) -> tuple:
        return ("fidelity", self.mechanism, self.pattern, self.temperature, self.inputs, self.options)

    def row(self) -> dict[str, Any]:
        return {
            "kind": "fidelity",
            "mechanism": self.mechanism,
            "pattern": self.pattern,
            "mode": "fidelity",
            "tokens": self.tokens,
            "tq": self.tokens,
            "tk": self.tokens,
            "batch": 1,
            "heads": self.heads,
            "kv_heads": self.heads,
            "head_dim": self.head_dim,
            "dtype": "float32",
            "options": dict(self.options),
            "extra": {"temperature": self.temperature, "inputs": self.inputs},
        }

    def measure(self, threads: int, budget: Budget) -> dict[str, Any]:
        return {"status": "ok", "error": measure_fidelity(self)}

    def label(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in self.options)
        return f"{self.mechanism}[{opts}] {self.pattern} T={self.tokens} tau={self.temperature} {self.inputs}"


def fidelity_inputs(case: FidelityCase, seed: int = SEED) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``q, k, v [1, T, H, D]``: Gaussian, or Gaussian mixtures around 8 shared centres (clustered)."""
    g = torch.Generator().manual_seed(seed + case.tokens)
    shape = (1, case.tokens, case.heads, case.head_dim)
    v = torch.randn(shape, generator=g)
    if case.inputs == "random":
        q, k = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    else:
        centres = torch.randn(8, case.head_dim, generator=g)  # tokens of one cluster attend to each other

        def mixture():
            pick = torch.randint(0, 8, shape[:3], generator=g)
            return centres[pick] + 0.3 * torch.randn(shape, generator=g)

        q, k = mixture(), mixture()
    return q * case.temperature, k, v


def fidelity_cases(names: str | list[str] = "*", lengths: tuple[int, ...] = (256, 1024, 4096)) -> list[FidelityCase]:
    """Every mechanism but softmax, each value of its knob, T, temperature and input kind, self patterns."""
    check_request((), lengths, (), ())
    cases = []
    for name in select_mechanisms(names):
        cls = REGISTRY.get(name)
        if name == "softmax":
            continue
        knob, values = cls.fidelity_knob or (None, (None,))
        for pattern in (Pattern.NONCAUSAL_SELF, Pattern.CAUSAL_SELF):
            if pattern not in cls.patterns:
                continue
            for value, t, tau, inputs in itertools.product(values, lengths, TEMPERATURES, INPUTS):
                if cls.spatial and square_grid(t) is None:
                    continue  # a spatial mechanism runs on square images only
                options = ((knob, value),) if knob else ()
                cases.append(FidelityCase(name, pattern.value, t, tau, inputs, options))
    return cases


def measure_fidelity(case: FidelityCase) -> float:
    q, k, v = fidelity_inputs(case)
    options = {k: v for k, v in case.options if v is not None}
    with torch.no_grad():
        exact = attend(q, k, v, "softmax", pattern=case.pattern)
        mech = create(case.mechanism, heads=case.heads, head_dim=case.head_dim, **options)
        grid = square_grid(case.tokens) if mech.spatial else None  # a spatial mechanism sees a square image
        approx = mech(q, k, v, pattern=case.pattern, spatial_shape=grid)
    return ((approx - exact).norm() / exact.norm()).item()
