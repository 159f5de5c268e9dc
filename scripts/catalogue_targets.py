"""Measure the performance targets of the catalogue (not a test: timings are noisy).

    .venv/bin/python scripts/catalogue_targets.py          # ~10 minutes on 2 cores

B=1, H=8, D=64, fp32, forward, causal_self where supported (else noncausal_self):
- each linear-in-T mechanism against SDPA softmax at T = 8192 (interleaved, best median of 2 rounds);
- its peak memory at 4K and 16K (the benchmark's worker: a fresh process per case);
- retention and lightning chunk paths against linear's chunk path at T = 8192;
- one decoding step (state advancing) at context 1K and 4K for the stateful ones.
"""

from __future__ import annotations

import torch
from core_targets import best_of, peak_bytes

import attnkit
from attnkit.bench.case import Budget
from attnkit.bench.speed import Case
from attnkit.testing import make_qkv

B, H, D = 1, 8, 64
LINEAR_IN_T = ["linear", "performer", "cosformer", "hedgehog", "rala", "softmax_free", "kernel_rpe_fft", "retention",
               "lightning", "aaren"]  # fmt: skip
OPTIONS = {"cosformer": {"max_len": 32768}}


def pattern_of(name: str) -> str:
    return "causal_self" if attnkit.Pattern.CAUSAL_SELF in attnkit.info(name).patterns else "noncausal_self"


def build(name: str):
    return attnkit.create(name, heads=H, head_dim=D, **OPTIONS.get(name, {}))


def speed(t: int = 8192) -> None:
    print(f"speed at T={t} against SDPA softmax (same pattern)")
    q, k, v = make_qkv(B, t, t, H, H, D)
    for name in LINEAR_IN_T:
        mech, pattern = build(name), pattern_of(name)
        mine = lambda m=mech, p=pattern: m(q, k, v, pattern=p)  # noqa: E731
        base = lambda p=pattern: attnkit.attend(q, k, v, pattern=p)  # noqa: E731
        r = best_of(2, runs=3, mech=mine, sdpa=base)
        mech(q, k, v, pattern=pattern)
        print(
            f"  {name:15s} {pattern:15s} {mech.last_path:13s} {r['mech']:8.1f} ms   SDPA {r['sdpa']:8.1f} ms"
            f"   SDPA/{name} = {r['sdpa'] / r['mech']:.2f}"
        )


def decay_vs_linear(t: int = 8192) -> None:
    print(f"chunk paths at T={t}, causal")
    q, k, v = make_qkv(B, t, t, H, H, D)
    mechs = {n: build(n) for n in ("linear", "retention", "lightning")}
    calls = {n: (lambda m=m: m(q, k, v, pattern="causal_self", path="chunk")) for n, m in mechs.items()}
    r = best_of(3, runs=3, **calls)
    for n in ("retention", "lightning"):
        print(f"  {n:10s} {r[n]:7.1f} ms   linear {r['linear']:7.1f} ms   ratio {r[n] / r['linear']:.2f}")


def memory() -> None:
    print("peak memory (forward), 4K -> 16K")
    for name in LINEAR_IN_T:
        pattern = pattern_of(name)
        peaks = [peak_bytes(name, pattern, t, options=OPTIONS.get(name))[0] for t in (4096, 16384)]
        print(
            f"  {name:15s} {pattern:15s} {peaks[0] / 2**20:7.0f} MiB -> {peaks[1] / 2**20:7.0f} MiB"
            f"   x{peaks[1] / peaks[0]:.2f}"
        )


def decode() -> None:
    print("one decoding step (state advancing), median ms at context 1K and 4K, and state bytes at 4K")
    for name in ["softmax", *[n for n in LINEAR_IN_T if attnkit.info(n).supports_state], "rat", "gaussian", "complex",
                 "sqa", "moh", "sigmoid", "sliding_window"]:  # fmt: skip
        if not attnkit.info(name).supports_state:
            continue
        ms, nbytes = [], 0
        for t in (1024, 4096):
            case = Case("decode", name, "auto", "causal_self", "decode", t, runs=20, options=OPTIONS.get(name, {}))
            r = case.measure(threads=torch.get_num_threads(), budget=Budget(time_s=60, timing_s=2))
            ms.append(r["median_ms"])
            nbytes = r["state_bytes"]
        print(f"  {name:15s} {r['path']:11s} {ms[0]:6.2f} ms  {ms[1]:6.2f} ms   state {nbytes / 2**20:7.2f} MiB")


if __name__ == "__main__":
    torch.set_num_threads(2)
    with torch.no_grad():
        speed()
        decay_vs_linear()
        decode()
    memory()
