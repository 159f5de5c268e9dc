"""Peak memory of one attention call.

CPU: a fresh Python subprocess per case; the peak resident set (``ru_maxrss``) after the call minus
the peak after building the inputs, so the interpreter, torch and the inputs are not counted.
GPU: ``torch.cuda.max_memory_allocated`` around the call, minus what was allocated before it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict, dataclass

import torch

_CHILD = r"""
import json, resource, sys
import torch
import attnkit
from attnkit.bench.memory import run_case
spec = json.loads(sys.argv[1])
torch.set_num_threads(spec.pop("threads"))
fn = run_case(spec)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
fn()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"peak_bytes": (peak - base) * 1024, "path": attnkit.last_path()}))
"""


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
