"""The one case protocol every benchmark kind follows, and the constants the kinds share.

A case is plain data (it crosses a process boundary to its worker) that knows how to describe itself
to the store (``key``, ``row``, ``label``), which curve it belongs to (``series``, used by the skip
predictor), what its cost grows like (``declared_growth``), and how to measure itself (``measure``,
run in a fresh worker process when ``isolated``, else in the sweep's own process). The sweep in
``runner.py`` runs any mix of kinds with one loop: speed, decode and peer cases (``speed.Case``) and
fidelity cases (``fidelity.FidelityCase``) today, quality cases next.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

SEED = 0  # every case's inputs come from this seed (recorded on each row)
MODES = ("fwd", "fwdbwd", "decode")
DTYPES = ("float32", "bfloat16", "float16")
BASELINES = {("softmax", "sdpa"): "SDPA softmax", ("softmax", "reference"): "naive softmax"}
BACKWARD_FLOP_FACTOR = 3.5  # forward + backward = 3.5 x forward (FlashAttention's convention)
# options the sweep gives mechanisms (defaults otherwise): the values a reader expects in a comparison
BENCH_OPTIONS: dict[str, dict[str, Any]] = {
    "sliding_window": {"window": 256},
    "block_sparse": {"seed": 0},  # a fixed draw of random blocks, the same in its FlexAttention peer
    "cosformer": {"max_len": 131072},  # positions must stay below max_len: room for the GPU preset's lengths
    "linformer": {"max_len": 32768},  # E, F must span the longest speed case (the GPU preset's 32K)
    "reformer": {"n_buckets": 128, "n_hashes": 4},  # reformer-pytorch's bucket_size 64 at T = 8192
}


@dataclass(frozen=True)
class Budget:
    time_s: float = 60.0  # per case: warm-up plus timed runs
    memory_bytes: int = 0  # per case peak; 0: 60% of the memory available when the sweep starts
    timing_s: float = 2.0  # per case: how long the paired timing rounds may go on to narrow their spread

    def resolved_memory(self) -> int:
        if self.memory_bytes:
            return self.memory_bytes
        return int(available_memory() * 0.6)


def available_memory() -> int:
    """Bytes of memory available now (MemAvailable), or 8 GiB where the OS does not say."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30


class BenchCase:
    """What the sweep needs of a case of any kind (subclasses are frozen dataclasses)."""

    kind: str
    tokens: int
    isolated: ClassVar[bool] = True  # measure in a fresh worker process (timings, memory)
    timed: ClassVar[bool] = True  # its cost is a latency the skip predictor can extrapolate

    def key(self, device_name: str, threads: int) -> str:
        """Identity in the store: what was measured and on which machine (not the code revision)."""
        raise NotImplementedError

    def label(self) -> str:
        raise NotImplementedError

    def row(self) -> dict[str, Any]:
        """The descriptive columns of this case's result row."""
        raise NotImplementedError

    @property
    def series(self) -> tuple:
        """Everything but T: cases of one series form one curve."""
        raise NotImplementedError

    def declared_growth(self) -> float:
        """Exponent of T in this case's declared cost (the skip predictor's prior)."""
        return 2.0

    def calls(self) -> int:
        """How many calls a measurement makes at least (warm-up, memory probe, timed rounds)."""
        return 1

    def measure(self, threads: int, budget: Budget) -> dict[str, Any]:
        """Measure, returning the result columns (``status`` ok, figures...); raise on failure."""
        raise NotImplementedError


_T_POWER = [
    (re.compile(r"T\s*²|T\^2|Tq\s*·\s*Tk|T\s*·\s*T\b"), 2.0),
    (re.compile(r"T\s*·?\s*√\s*T|T\^1\.5"), 1.5),
    (re.compile(r"\bT\b"), 1.0),
]


def growth_from_complexity(text: str, path: str) -> float:
    """Exponent of T in a complexity text such as ``O(T·D²)`` (1) or ``O(Tq·Tk·D)`` (2).

    Texts naming paths, ``O(T·log T·m) (fft), O(T·w·D) (banded)``, are read for ``path``; a text
    with no T term counts as quadratic (the safe guess).
    """
    parts = re.findall(r"(O\([^)]*(?:\([^)]*\)[^)]*)*\))\s*(?:\(([a-z_ ,]+)\))?", text)
    chosen = next((o for o, names in parts if path in [n.strip() for n in names.split(",")]), None)
    chosen = chosen or (parts[0][0] if parts else text)
    for pattern, power in _T_POWER:
        if pattern.search(chosen):
            return power
    return 2.0
