"""How far each mechanism's output is from exact softmax attention (no training involved).

For T, a temperature tau that scales q (tau > 1: peaked attention, tau < 1: flat), random or
clustered inputs, and each value of the mechanism's knob (window, features...): the relative error
``||out - softmax(q k^T / sqrt(d)) v|| / ||softmax(...) v||``. Every mechanism except softmax itself
is measured, exact-sparse ones too: their distance from full attention is the point of the figure.
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import asdict, dataclass

import torch

from ..api import attend, create
from ..mechanism import REGISTRY
from ..patterns import Pattern
from .cases import _check_request
from .env import command_line, environment, new_run_id
from .progress import Progress
from .runner import Summary
from .store import Store
from .worker import SEED

TEMPERATURES = (0.5, 1.0, 2.0)
INPUTS = ("random", "clustered")


@dataclass(frozen=True)
class FidelityCase:
    mechanism: str
    pattern: str
    tokens: int
    temperature: float
    inputs: str
    options: tuple[tuple[str, object], ...]
    heads: int = 4
    head_dim: int = 64

    def key(self, device_name: str) -> str:
        return json.dumps({"kind": "fidelity", **asdict(self), "device_name": device_name}, sort_keys=True)

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


def fidelity_cases(names: str = "*", lengths: tuple[int, ...] = (256, 1024, 4096)) -> list[FidelityCase]:
    _check_request(names, (), lengths, (), ())
    cases = []
    for name in REGISTRY.names(names):
        cls = REGISTRY.get(name)
        if name == "softmax" or cls.kind != "attention":
            continue
        knob, values = cls.fidelity_knob or (None, (None,))
        for pattern in (Pattern.NONCAUSAL_SELF, Pattern.CAUSAL_SELF):
            if pattern not in cls.patterns:
                continue
            for value, t, tau, inputs in itertools.product(values, lengths, TEMPERATURES, INPUTS):
                options = ((knob, value),) if knob else ()
                cases.append(FidelityCase(name, pattern.value, t, tau, inputs, options))
    return cases


def measure_fidelity(case: FidelityCase) -> float:
    q, k, v = fidelity_inputs(case)
    options = {k: v for k, v in case.options if v is not None}
    with torch.no_grad():
        exact = attend(q, k, v, "softmax", pattern=case.pattern)
        mech = create(case.mechanism, heads=case.heads, head_dim=case.head_dim, **options)
        approx = mech(q, k, v, pattern=case.pattern)
    return ((approx - exact).norm() / exact.norm()).item()


def run_fidelity(
    store: Store, cases: list[FidelityCase], *, force: bool = False, show_progress: bool = True
) -> Summary:
    threads = torch.get_num_threads()
    env = environment("cpu", threads, SEED)
    todo = [c for c in cases if force or not store.done(c.key(env["device"]))]
    summary = Summary(already_done=len(cases) - len(todo))
    if not todo:
        return summary
    run = store.start_run(new_run_id(), env, command_line())
    summary.run_id = run.run_id
    progress = Progress(len(todo), enabled=show_progress)
    try:
        for case in todo:
            progress.start(case.label())
            started = time.perf_counter()
            row = {
                "kind": "fidelity",
                "case_key": case.key(env["device"]),
                "mechanism": case.mechanism,
                "pattern": case.pattern,
                "mode": "fidelity",
                "tokens": case.tokens,
                "tq": case.tokens,
                "tk": case.tokens,
                "batch": 1,
                "heads": case.heads,
                "kv_heads": case.heads,
                "head_dim": case.head_dim,
                "dtype": "float32",
                "options": dict(case.options),
                "extra": {"temperature": case.temperature, "inputs": case.inputs},
            }
            try:
                err = measure_fidelity(case)
                store.add(run, {**row, "status": "ok", "error": err})
                summary.count(case.label(), "ok")
            except Exception as exc:  # noqa: BLE001 - one failing case is recorded, the sweep goes on
                reason = f"{type(exc).__name__}: {exc}"[:400]
                store.add(run, {**row, "status": "error", "reason": reason})
                summary.count(case.label(), "error", reason)
            progress.finish_case(time.perf_counter() - started)
    except KeyboardInterrupt:
        return summary.close(store, run, progress, interrupted=True)
    return summary.close(store, run, progress)
