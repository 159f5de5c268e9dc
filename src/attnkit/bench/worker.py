"""Measure one case: the body of the worker process the sweep starts for each case (``child``).

Each case runs in a fresh process (forked from a forkserver that has torch and attnkit imported), so
a crash, an out-of-memory kill or a hang ends only that case, and the CPU peak-memory figure belongs
to this case alone. The result dict goes back to the sweep over a pipe.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..api import create
from ..patterns import as_pattern
from ..testing import make_qkv
from .cases import Case
from .memory import call_peak_bytes
from .timing import time_fn

SEED = 0  # every case's inputs come from this seed (recorded on each row)
BACKWARD_FLOP_FACTOR = 3.5  # forward + backward = 3.5 x forward (FlashAttention's convention)


def _peak_bytes(fn: Callable[[], object], device: str) -> int:
    if not device.startswith("cuda"):
        return call_peak_bytes(fn)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return max(0, torch.cuda.max_memory_allocated() - base)


def _speed_call(case: Case) -> tuple[Callable[[], object], Callable[[], str], float]:
    """The timed closure, a getter of the path it ran, and its useful FLOPs."""
    dtype = getattr(torch, case.dtype)
    grad = case.mode == "fwdbwd"
    q, k, v = make_qkv(
        case.batch,
        case.tq,
        case.tk,
        case.heads,
        case.kv_heads,
        case.head_dim,
        dtype=dtype,
        device=case.device,
        requires_grad=grad,
    )
    if case.kind == "peer":
        from .peers import peer_call

        fn, flops = peer_call(case, q, k, v)
        return fn, (lambda: case.peer or "?"), flops
    mech = create(case.mechanism, heads=case.heads, head_dim=case.head_dim, **case.options).to(case.device)
    flops = mech.flops(case.shape(), as_pattern(case.pattern)) * (BACKWARD_FLOP_FACTOR if grad else 1.0)

    def call():
        with torch.set_grad_enabled(grad):
            out = mech(q, k, v, pattern=case.pattern, path=case.path)
            if grad:
                out.backward(torch.ones_like(out))
        return out

    return call, (lambda: mech.last_path or "?"), flops


def _decode_call(case: Case) -> tuple[Callable[[], object], Callable[[], str], int]:
    """Decoding steps at context ~T: prefill T tokens once, then each call decodes the next token and
    keeps the new state (as a real decoder does, so KV caches append in place)."""
    dtype = getattr(torch, case.dtype)
    mech = create(case.mechanism, heads=case.heads, head_dim=case.head_dim, **case.options).to(case.device)
    extra = 2 * case.runs + 8  # tokens to decode: memory probe, warm-up and timed runs
    total = case.tokens + extra
    q, k, v = make_qkv(case.batch, total, total, case.heads, case.kv_heads, case.head_dim, dtype=dtype,
                       device=case.device)  # fmt: skip
    t = case.tokens
    with torch.no_grad():
        _, state = mech(q[:, :t], k[:, :t], v[:, :t], pattern="causal_self", return_state=True)
    prefilled_bytes = state.nbytes
    pos = t

    def step():
        nonlocal state, pos
        if pos >= total:
            raise RuntimeError("decode benchmark ran out of prepared tokens")
        sl = slice(pos, pos + 1)
        with torch.no_grad():
            out, state = mech(q[:, sl], k[:, sl], v[:, sl], pattern="causal_self", state=state, return_state=True)
        pos += 1
        return out

    return step, (lambda: mech.last_path or "?"), prefilled_bytes


def measure(case: Case) -> dict[str, Any]:
    torch.manual_seed(SEED)
    state_bytes = None
    flops = None
    if case.kind == "decode":
        fn, path, state_bytes = _decode_call(case)
    else:
        fn, path, flops = _speed_call(case)
    peak = _peak_bytes(fn, case.device)  # the first call also warms up
    timing = time_fn(fn, warmup=1, runs=case.runs, device=case.device)
    result = {
        "status": "ok",
        "path": path(),
        "median_ms": timing.median_ms,
        "min_ms": timing.min_ms,
        "max_ms": timing.max_ms,
        "runs": timing.runs,
        "peak_bytes": peak,
        "state_bytes": state_bytes,
    }
    if flops is not None:
        result["flops"] = flops
        result["gflops"] = flops / (timing.median_ms * 1e-3) / 1e9
    return result


def measure_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """Measure a case given as a dict (with ``threads``); errors become a status, not an exception."""
    spec = dict(spec)
    torch.set_num_threads(int(spec.pop("threads")))
    try:
        return measure(Case(**spec))
    except (MemoryError, torch.OutOfMemoryError) as err:
        return {"status": "oom", "reason": f"{type(err).__name__}: {str(err)[:300]}"}
    except Exception as err:  # noqa: BLE001 - any failure of the measured code is a result to record
        kind = "oom" if "out of memory" in str(err).lower() else "error"
        return {"status": kind, "reason": f"{type(err).__name__}: {str(err)[:300]}"}


def child(conn, spec: dict[str, Any]) -> None:
    """Entry point of a worker process forked by the sweep; sends one result dict back."""
    conn.send(measure_spec(spec))
    conn.close()
