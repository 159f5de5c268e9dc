"""Measure the performance targets of the core issue on this machine (not a test: timings are noisy).

    .venv/bin/python scripts/core_targets.py            # all figures, ~3 minutes on 2 cores

B=1, H=8, D=64, fp32, forward. Each comparison interleaves the candidates for several rounds and
keeps each one's best median (torch.utils.benchmark via attnkit.bench.timing), so machine noise hits
both alike. Check `uptime` first: figures from a busy machine are not figures. Peak memory is measured in a fresh
subprocess per case (the benchmark's own worker: VmHWM above the resident set after building the inputs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import attnkit
from attnkit.bench.runner import run_worker
from attnkit.bench.speed import Case
from attnkit.bench.timing import time_call
from attnkit.testing import make_qkv

B, H, D = 1, 8, 64


def best_of(rounds: int, runs: int = 5, **candidates) -> dict[str, float]:
    """Each candidate's best median over ``rounds`` interleaved rounds of ``runs`` timed calls."""
    best = {name: float("inf") for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            t = time_call(fn, threads=torch.get_num_threads(), budget_s=0.5, min_rounds=runs)
            best[name] = min(best[name], t.median_ms)
    return best


def peak_bytes(name: str, pattern: str, t: int, mode: str = "fwd", options: dict | None = None) -> tuple[int, str]:
    """(peak bytes, path) of one call as the benchmark measures it: its worker, a fresh process per case."""
    case = Case("speed", name, "auto", pattern, mode, t, batch=B, heads=H, kv_heads=H, head_dim=D,
                options=options or {}, runs=1)  # fmt: skip
    result = run_worker(case, threads=2, timeout_s=600)
    if result["status"] != "ok":
        raise RuntimeError(f"{name} {pattern} T={t} {mode}: {result}")
    return result["peak_bytes"], result["path"]


def softmax_overhead() -> None:
    print("softmax via attnkit vs F.scaled_dot_product_attention on [B, H, T, D] tensors")
    for t in (1024, 2048, 4096, 8192):
        for causal in (False, True):
            q, k, v = make_qkv(B, t, t, H, H, D)
            qh, kh, vh = (x.transpose(1, 2).contiguous() for x in (q, k, v))
            pattern = "causal_self" if causal else "noncausal_self"
            r = best_of(
                3 if t <= 4096 else 2,
                direct=lambda: F.scaled_dot_product_attention(qh, kh, vh, is_causal=causal),  # noqa: B023
                attnkit=lambda: attnkit.attend(q, k, v, pattern=pattern),  # noqa: B023
            )
            print(
                f"  T={t:5d} {pattern:15s} direct {r['direct']:8.1f} ms  attnkit {r['attnkit']:8.1f} ms"
                f"  ratio {r['attnkit'] / r['direct']:.3f}"
            )


def versus_sdpa(name: str, pattern: str, lengths, **options) -> None:
    for t in lengths:
        q, k, v = make_qkv(B, t, t, H, H, D)
        r = best_of(
            2,
            mech=lambda: attnkit.attend(q, k, v, name, pattern=pattern, **options),  # noqa: B023
            sdpa=lambda: attnkit.attend(q, k, v, pattern=pattern),  # noqa: B023
        )
        attnkit.attend(q, k, v, name, pattern=pattern, **options)
        print(
            f"  {name} {pattern} T={t}: {r['mech']:.1f} ms ({attnkit.last_path()}), SDPA {r['sdpa']:.1f} ms,"
            f" SDPA/{name} = {r['sdpa'] / r['mech']:.2f}"
        )


def memory(name: str, lengths, **options) -> None:
    """Peak memory as the benchmark measures it: the sweep's worker process, one fresh process per case."""
    for mode in ("fwd", "fwdbwd"):
        row, path = [], "?"
        for t in lengths:
            peak, path = peak_bytes(name, "causal_self", t, mode, options)
            row.append(f"T={t}: {peak / 2**20:.0f} MiB")
        print(f"  {name} ({path}) peak memory {'fwd+bwd' if mode == 'fwdbwd' else 'fwd'}: " + ", ".join(row))


if __name__ == "__main__":
    torch.set_num_threads(2)
    with torch.no_grad():
        softmax_overhead()
        print("linear, causal")
        versus_sdpa("linear", "causal_self", (4096, 8192))
        print("sliding_window (window 256), causal")
        versus_sdpa("sliding_window", "causal_self", (4096, 8192), window=256)
        print("sigmoid blocked vs SDPA softmax, T = 4096")
        versus_sdpa("sigmoid", "noncausal_self", (4096,))
        versus_sdpa("sigmoid", "causal_self", (4096,))
    print("peak memory (causal)")
    memory("linear", (4096, 8192, 16384))
    memory("sliding_window", (4096, 8192, 16384), window=256)
    memory("softmax", (4096, 8192, 16384))
