"""Measure one case, watching the machine while it runs: the body of the sweep's worker process.

Isolated cases run in a fresh process (forked from a forkserver that has torch and attnkit imported),
so a crash, an out-of-memory kill or a hang ends only that case, and the CPU peak-memory figure
belongs to this case alone. The result dict goes back to the sweep over a pipe. Cases that need no
isolation (fidelity) run through the same function in the sweep's own process.
"""

from __future__ import annotations

from typing import Any

import torch

from . import machine
from .case import BenchCase, Budget


def measure_watched(case: BenchCase, threads: int, budget: Budget) -> dict[str, Any]:
    """``case.measure`` plus what the machine did meanwhile; errors become a status, not an exception."""
    torch.set_num_threads(threads)
    try:
        before = machine.sample()
        calib = machine.calibrate(getattr(case, "device", "cpu")) if case.timed else None
        result = case.measure(threads, budget)
        load = machine.Load.between(before, machine.sample())
    except (MemoryError, torch.OutOfMemoryError) as err:
        return {"status": "oom", "reason": f"{type(err).__name__}: {str(err)[:300]}"}
    except Exception as err:  # noqa: BLE001 - any failure of the measured code is a result to record
        kind = "oom" if "out of memory" in str(err).lower() else "error"
        return {"status": kind, "reason": f"{type(err).__name__}: {str(err)[:300]}"}
    return {**result, "calib_gflops": calib, "others_cores": load.others_cores, "steal": load.steal}


def child(conn, case: BenchCase, threads: int, budget: Budget) -> None:
    """Entry point of a worker process forked by the sweep; sends one result dict back."""
    conn.send(measure_watched(case, threads, budget))
    conn.close()
