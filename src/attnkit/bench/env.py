"""The environment a benchmark runs in: versions, device, threads, git revision, matmul peak."""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import torch

from .timing import time_call


def git_revision() -> str:
    """The attnkit checkout's commit (``+dirty`` with local changes), or ``unknown`` outside git."""
    src = Path(__file__).resolve().parents[3]

    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(src), *args], capture_output=True, text=True, timeout=10, check=True)
        return done.stdout.strip()

    try:
        rev = git("rev-parse", "--short=12", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return rev + ("+dirty" if dirty else "")


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu} ({os.cpu_count()} cores)"


def environment(device: str, threads: int, seed: int) -> dict[str, Any]:
    return {
        "git_rev": git_revision(),
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "device": device_name(device),
        "threads": threads,
        "seed": seed,
        "hostname": socket.gethostname(),
    }


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]


def matmul_peak_gflops(device: str, dtype: torch.dtype, *, size: int | None = None) -> float:
    """This machine's practical matmul peak: the best of several square GEMMs, in GFLOP/s."""
    n = size or (8192 if device.startswith("cuda") else 2048)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = time_call(lambda: a @ b, threads=torch.get_num_threads(), budget_s=1.0)
    return 2 * n**3 / (t.min_ms * 1e-3) / 1e9


def command_line() -> str:
    return " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
