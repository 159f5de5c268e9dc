"""Peak memory of one attention call.

CPU: a fresh Python subprocess per case. After the inputs are built, the peak resident set is reset
(``/proc/self/clear_refs``) and the call's peak is the high-water mark (``VmHWM``) minus the resident
set just before the call, so the interpreter, torch and the inputs are not counted. ``ru_maxrss``
alone would not do: a child inherits its parent's peak across fork and exec, so a child of a big
process reports nothing. Where /proc is missing, ``ru_maxrss`` minus the baseline is the fallback.
GPU: ``torch.cuda.max_memory_allocated`` around the call, minus what was allocated before it.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from dataclasses import asdict, dataclass

import torch

log = logging.getLogger(__name__)

_CHILD = r"""
import json, sys
import torch
import attnkit
from attnkit.bench.memory import call_peak_bytes, run_case
spec = json.loads(sys.argv[1])
torch.set_num_threads(spec.pop("threads"))
peak = call_peak_bytes(run_case(spec))
sys.stdout.write(json.dumps({"peak_bytes": peak, "path": attnkit.last_path()}))  # the answer, to the parent
"""


def _status_kib(field: str) -> int | None:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM), or None where there is no /proc."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def call_peak_bytes(fn) -> int:
    """Peak resident memory that calling ``fn`` adds above the memory in use just before it."""
    import gc
    import resource

    gc.collect()
    base = _status_kib("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the high-water mark to the current resident set
        resettable = base is not None
    except OSError:
        resettable = False
    if not resettable:  # fall back to ru_maxrss (inherits the parent's peak: only right in a lean parent)
        log.warning("cannot reset the memory high-water mark here (no /proc/self/clear_refs): peak memory is"
                    " ru_maxrss above the baseline, which may include the parent process's peak")  # fmt: skip
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn()
    peak = _status_kib("VmHWM") if resettable else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return max(0, peak - base) * 1024


@dataclass(frozen=True)
class CallSpec:
    """One attention call, as plain data so it can cross a process boundary."""

    mechanism: str
    pattern: str
    batch: int
    tq: int
    tk: int
    heads: int
    kv_heads: int
    head_dim: int
    dtype: str = "float32"
    options: dict | None = None
    backward: bool = False
    path: str = "auto"


def run_case(spec: dict):
    """Build the inputs of a ``CallSpec`` dict and return a closure that makes the call once."""
    import attnkit
    from attnkit.testing import make_qkv

    s = CallSpec(**spec)
    dtype = getattr(torch, s.dtype)
    q, k, v = make_qkv(s.batch, s.tq, s.tk, s.heads, s.kv_heads, s.head_dim, dtype=dtype, requires_grad=s.backward)
    mech = attnkit.create(s.mechanism, heads=s.heads, head_dim=s.head_dim, **(s.options or {}))

    def call():
        with torch.set_grad_enabled(s.backward):
            out = mech(q, k, v, pattern=s.pattern, path=s.path)
            if s.backward:
                out.sum().backward()

    return call


def peak_memory_cpu(spec: CallSpec, *, threads: int = 1, timeout_s: float = 600) -> tuple[int, str]:
    """(peak bytes above baseline, path taken) of one call, measured in a fresh subprocess."""
    payload = json.dumps({**asdict(spec), "threads": threads})
    res = subprocess.run(
        [sys.executable, "-c", _CHILD, payload],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    if res.returncode != 0:
        raise RuntimeError(f"memory probe failed for {spec}: {res.stderr.strip()[-2000:]}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    return int(out["peak_bytes"]), out["path"]
