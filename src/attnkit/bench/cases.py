"""What a speed sweep measures: cases built from the registry, the peers' cases, and the presets.

Nothing here names a mechanism: every registered mechanism, each of its fast paths and each pattern
it supports is enumerated, plus two baselines in the same run: SDPA softmax (``softmax``/``sdpa``) and
a naive materialised softmax (``softmax``/``reference``). Every case also times SDPA beside itself
(``speed.py``), so its speed-up is paired.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..api import create, mechanisms
from ..errors import InvalidOption, UnknownMechanism, did_you_mean
from ..mechanism import REGISTRY
from ..patterns import Pattern, as_pattern
from .case import BENCH_OPTIONS, DTYPES, MODES
from .inputs import paths_for
from .peers import PEERS, available_peers, why_not
from .speed import Case

__all__ = ["Case", "PRESETS", "Preset", "check_request", "peer_cases", "select_mechanisms", "speed_cases"]

MAX_TOKENS = 1 << 22  # 4M tokens: longer is a typo, not a benchmark (checked before anything runs)


@dataclass(frozen=True)
class Preset:
    lengths: tuple[int, ...]
    dtypes: tuple[str, ...]
    modes: tuple[str, ...]
    device: str
    time_budget_s: float  # per case: cases predicted to take longer are recorded as skipped
    runs: int = 5  # timed rounds at least
    timing_s: float = 2.0  # per case: time the paired rounds may take once ``runs`` rounds are done
    decode_lengths: tuple[int, ...] = ()
    fidelity_lengths: tuple[int, ...] = (256, 1024, 4096)


PRESETS: dict[str, Preset] = {
    "quick": Preset(
        (256, 1024, 4096),
        ("float32",),
        ("fwd", "decode"),
        "cpu",
        10.0,
        runs=3,
        timing_s=0.25,
        decode_lengths=(1024, 4096),
        fidelity_lengths=(256, 1024),
    ),
    "cpu": Preset(
        (256, 512, 1024, 2048, 4096, 8192),
        ("float32",),
        ("fwd", "fwdbwd", "decode"),
        "cpu",
        60.0,
        timing_s=4.0,
        decode_lengths=(1024, 4096),
    ),
    "gpu": Preset(
        (1024, 2048, 4096, 8192, 16384, 32768),
        ("bfloat16", "float32"),
        ("fwd", "fwdbwd", "decode"),
        "cuda",
        30.0,
        runs=20,
        timing_s=4.0,
        decode_lengths=(4096, 16384, 65536),
    ),
}


def split_names(names: str | list[str] | tuple[str, ...]) -> list[str]:
    """``"lin*,sigmoid"``, ``["lin*", "sigmoid"]`` or ``"lin* sigmoid"`` -> ``["lin*", "sigmoid"]``."""
    items = [names] if isinstance(names, str) else list(names)
    for item in items:
        if not isinstance(item, str):
            raise InvalidOption(f"mechanism names must be strings; got {item!r} ({type(item).__name__})")
    out = [part for item in items for part in re.split(r"[,\s]+", item) if part]
    return out or ["*"]


def select_mechanisms(names: str | list[str] | tuple[str, ...], *, kind: str | None = "attention") -> list[str]:
    """The registered names matching any of the names or globs; each one must match something."""
    chosen: list[str] = []
    every = REGISTRY.names()
    for glob in split_names(names):
        found = [i.name for i in mechanisms(glob, kind=kind)]
        if not found:
            hint = did_you_mean(glob, every)
            raise UnknownMechanism(f"no mechanism matches {glob!r}.{hint} Available: {', '.join(every)}")
        chosen.extend(n for n in found if n not in chosen)
    return chosen


def check_request(patterns, lengths, dtypes, modes) -> list[Pattern]:
    """Validate a sweep request up front, before anything is written."""
    pats = [as_pattern(p) for p in patterns]
    for t in lengths:
        if isinstance(t, bool) or not isinstance(t, int) or not 0 < t <= MAX_TOKENS:
            raise InvalidOption(f"lengths must be integers from 1 to {MAX_TOKENS}; got {t!r}")
    for d in dtypes:
        if d not in DTYPES:
            raise InvalidOption(f"unknown dtype {d!r}; expected one of {', '.join(DTYPES)}")
    for m in modes:
        if m not in MODES:
            raise InvalidOption(f"unknown mode {m!r}; expected one of {', '.join(MODES)}")
    return pats


def speed_cases(
    *,
    names: str | list[str] = "*",
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
    pats = check_request(patterns, (*lengths, *decode_lengths), dtypes, modes)
    selected = select_mechanisms(names)
    wanted = sorted(set(selected) | {"softmax"})  # the baselines are always measured
    cases: list[Case] = []
    for name in wanted:
        cls = REGISTRY.get(name)
        options = BENCH_OPTIONS.get(name, {})
        mech = create(name, heads=heads, head_dim=head_dim, **options)
        shape = dict(heads=heads, kv_heads=heads, head_dim=head_dim, options=options)
        for pattern in pats:
            if pattern not in cls.patterns:
                continue
            paths = [p.name for p in paths_for(cls, mech, pattern, device)] if name in selected else []
            if name == "softmax":
                paths = sorted(set(paths) | {"sdpa", "reference"})
            for path in paths:
                for mode in (m for m in modes if m != "decode"):
                    for d in dtypes:
                        for t in lengths:
                            case = Case("speed", name, path, pattern.value, mode, t, d, device, runs=runs, **shape)
                            if _fits(case):
                                cases.append(case)
        # a spatial mechanism decodes by whole rows, not by the token: no per-token decode case
        decodes = "decode" in modes and cls.state_kind is not None and Pattern.CAUSAL_SELF in cls.patterns
        decodes = decodes and not cls.spatial
        if decodes and name in selected:
            cases.extend(
                Case("decode", name, "auto", "causal_self", "decode", t, d, device, runs=runs, **shape)
                for d in dtypes
                for t in decode_lengths
            )
    return cases


def _fits(case: Case) -> bool:
    """A spatial mechanism runs on a square image: lengths whose queries do not fill one are left out."""
    return not REGISTRY.get(case.mechanism).spatial or case.spatial_shape is not None


def only_baselines(cases: list[Case], names) -> bool:
    """Whether the selected mechanisms contribute no case (say, a noncausal-only one with causal patterns)."""
    chosen = set(select_mechanisms(names))
    return not any(c.mechanism in chosen for c in cases)


def peer_cases(
    *,
    lengths: tuple[int, ...],
    patterns: tuple[str, ...],
    dtypes: tuple[str, ...],
    modes: tuple[str, ...],
    device: str,
    runs: int,
    heads: int = 8,
    head_dim: int = 64,
    names: str | list[str] | None = None,
) -> list[Case]:
    """One case per (available peer of a selected mechanism, pattern it supports, T, dtype, mode it can run);
    others are left out. ``names`` selects mechanisms as ``--mechanisms`` does (None: every peer)."""
    pats = [p.value for p in check_request(patterns, lengths, dtypes, modes)]
    chosen = None if names is None else set(select_mechanisms(names))
    cases = []
    for name in available_peers():
        spec = PEERS[name]
        if chosen is not None and spec.mechanism not in chosen:
            continue
        for pattern in (p for p in pats if p in spec.patterns):
            for mode in (m for m in modes if m in ("fwd", "fwdbwd")):
                for d in dtypes:
                    for t in lengths:
                        case = Case(
                            "peer",
                            spec.mechanism,
                            "peer",
                            pattern,
                            mode,
                            t,
                            d,
                            device,
                            heads=heads,
                            kv_heads=heads,
                            head_dim=head_dim,
                            options=dict(spec.options),
                            runs=runs,
                            peer=name,
                        )
                        if why_not(case) is None:
                            cases.append(case)
    return cases
