"""What a speed sweep measures: cases built from the registry, and the presets.

A case is plain data (it crosses a process boundary to the worker). Nothing here names a mechanism:
every registered mechanism, each of its fast paths and each pattern it supports is enumerated, plus
two baselines in the same run: SDPA softmax (``softmax``/``sdpa``) and a naive materialised softmax
(``softmax``/``reference``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from ..api import create, mechanisms
from ..errors import InvalidOption, UnknownMechanism
from ..mechanism import REGISTRY, Shape
from ..patterns import Pattern, as_pattern
from ..testing import paths_for

MODES = ("fwd", "fwdbwd", "decode")
DTYPES = ("float32", "bfloat16", "float16")
BASELINES = {("softmax", "sdpa"): "SDPA softmax", ("softmax", "reference"): "naive softmax"}
# options the sweep gives mechanisms (defaults otherwise): the values a reader expects in a comparison
BENCH_OPTIONS: dict[str, dict[str, Any]] = {
    "sliding_window": {"window": 256},
    "cosformer": {"max_len": 131072},  # positions must stay below max_len: room for the GPU preset's lengths
}


@dataclass(frozen=True)
class Preset:
    lengths: tuple[int, ...]
    dtypes: tuple[str, ...]
    modes: tuple[str, ...]
    device: str
    time_budget_s: float  # per case: cases predicted to take longer are recorded as skipped
    runs: int = 5
    decode_lengths: tuple[int, ...] = ()
    fidelity_lengths: tuple[int, ...] = (256, 1024, 4096)


PRESETS: dict[str, Preset] = {
    "quick": Preset(
        (256, 1024, 4096),
        ("float32",),
        ("fwd", "decode"),
        "cpu",
        15.0,
        decode_lengths=(1024, 4096),
        fidelity_lengths=(256, 1024),
    ),
    "cpu": Preset(
        (256, 512, 1024, 2048, 4096, 8192),
        ("float32",),
        ("fwd", "fwdbwd", "decode"),
        "cpu",
        60.0,
        decode_lengths=(1024, 4096),
    ),
    "gpu": Preset(
        (1024, 2048, 4096, 8192, 16384, 32768),
        ("bfloat16", "float32"),
        ("fwd", "fwdbwd", "decode"),
        "cuda",
        30.0,
        runs=20,
        decode_lengths=(4096, 16384, 65536),
    ),
}


@dataclass(frozen=True)
class Case:
    """One measurement. ``tokens`` is T: keys, and queries for self patterns (cross: Tq = T / 4)."""

    kind: str  # speed | decode | peer
    mechanism: str
    path: str
    pattern: str
    mode: str
    tokens: int
    dtype: str = "float32"
    device: str = "cpu"
    batch: int = 1
    heads: int = 8
    kv_heads: int = 8
    head_dim: int = 64
    options: dict[str, Any] = field(default_factory=dict)
    runs: int = 5
    peer: str | None = None  # peer adapter name (kind == "peer")

    @property
    def tq(self) -> int:
        if self.mode == "decode":
            return 1
        return self.tokens if as_pattern(self.pattern).is_self else max(1, self.tokens // 4)

    @property
    def tk(self) -> int:
        return self.tokens

    @property
    def series(self) -> tuple:
        """Everything but T: cases of one series form one curve."""
        return (
            self.kind,
            self.mechanism,
            self.path,
            self.pattern,
            self.mode,
            self.dtype,
            self.device,
            self.peer,
            json.dumps(self.options, sort_keys=True),
        )

    def shape(self) -> Shape:
        return Shape(self.batch, self.tq, self.tk, self.heads, self.kv_heads, self.head_dim, self.head_dim)

    def key(self, device_name: str, threads: int) -> str:
        """Identity in the store: what was measured and on which machine (not the code revision)."""
        d = asdict(self)
        d.pop("runs")
        return json.dumps({**d, "device_name": device_name, "threads": threads}, sort_keys=True)

    def label(self) -> str:
        base = BASELINES.get((self.mechanism, self.path))
        name = base or (f"{self.peer} (peer)" if self.peer else f"{self.mechanism}/{self.path}")
        return f"{name} {self.pattern} {self.mode} T={self.tokens} {self.dtype}"

    def row(self) -> dict[str, Any]:
        """The descriptive columns of this case's result row."""
        return {
            "kind": self.kind,
            "mechanism": self.mechanism,
            "path": self.path,
            "pattern": self.pattern,
            "mode": self.mode,
            "tokens": self.tokens,
            "tq": self.tq,
            "tk": self.tk,
            "batch": self.batch,
            "heads": self.heads,
            "kv_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "dtype": self.dtype,
            "options": self.options,
            "extra": {"peer": self.peer} if self.peer else {},
        }


def _check_request(names: str, patterns, lengths, dtypes, modes) -> list[Pattern]:
    """Validate a sweep request up front, before anything is written."""
    if not REGISTRY.names(names):
        raise UnknownMechanism(f"no mechanism matches {names!r}; available: {', '.join(REGISTRY.names())}")
    pats = [as_pattern(p) for p in patterns]
    for t in lengths:
        if isinstance(t, bool) or not isinstance(t, int) or t <= 0:
            raise InvalidOption(f"lengths must be positive integers; got {t!r}")
    for d in dtypes:
        if d not in DTYPES:
            raise InvalidOption(f"unknown dtype {d!r}; expected one of {', '.join(DTYPES)}")
    for m in modes:
        if m not in MODES:
            raise InvalidOption(f"unknown mode {m!r}; expected one of {', '.join(MODES)}")
    return pats


def speed_cases(
    *,
    names: str = "*",
    patterns: tuple[str, ...] = tuple(p.value for p in Pattern),
    lengths: tuple[int, ...],
    dtypes: tuple[str, ...] = ("float32",),
    modes: tuple[str, ...] = ("fwd",),
    device: str = "cpu",
    runs: int = 5,
    decode_lengths: tuple[int, ...] = (),
    heads: int = 8,
    head_dim: int = 64,
) -> list[Case]:
    """Every (mechanism, fast path, supported pattern, T, dtype, mode), baselines included."""
    pats = _check_request(names, patterns, lengths, dtypes, modes)
    selected = [i.name for i in mechanisms(names, kind="attention")]
    wanted = sorted(set(selected) | {"softmax"})  # the baselines are always measured
    cases: list[Case] = []
    for name in wanted:
        cls = REGISTRY.get(name)
        options = BENCH_OPTIONS.get(name, {})
        mech = create(name, heads=heads, head_dim=head_dim, **options)
        for pattern in pats:
            if pattern not in cls.patterns:
                continue
            paths = [p.name for p in paths_for(cls, mech, pattern, device)] if name in selected else []
            if name == "softmax":
                paths = sorted(set(paths) | {"sdpa", "reference"})
            for path in paths:
                for mode in (m for m in modes if m != "decode"):
                    cases.extend(
                        Case(
                            "speed",
                            name,
                            path,
                            pattern.value,
                            mode,
                            t,
                            d,
                            device,
                            heads=heads,
                            kv_heads=heads,
                            head_dim=head_dim,
                            options=options,
                            runs=runs,
                        )
                        for d in dtypes
                        for t in lengths
                    )
        if (
            "decode" in modes
            and cls.state_kind is not None
            and name in selected
            and Pattern.CAUSAL_SELF in cls.patterns
        ):
            cases.extend(
                Case(
                    "decode",
                    name,
                    "auto",
                    "causal_self",
                    "decode",
                    t,
                    d,
                    device,
                    heads=heads,
                    kv_heads=heads,
                    head_dim=head_dim,
                    options=options,
                    runs=max(runs, 10),
                )
                for d in dtypes
                for t in decode_lengths
            )
    return cases
