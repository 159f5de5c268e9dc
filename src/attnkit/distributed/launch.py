"""Run a function on W fresh processes joined in one process group (gloo on CPU): what ``attnkit bench cp`` and the
distributed tests use. ``run(world, fn, *args)`` calls ``fn(rank, world, *args)`` in every process and returns each
rank's (picklable) result, rank order. A rank that raises makes ``run`` raise :class:`RankFailed` naming the rank and
its error; a rank that does not finish within ``timeout`` seconds is killed, with every other, and ``run`` raises.
"""

from __future__ import annotations

import pickle
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ..errors import AttnkitError


class RankFailed(AttnkitError, RuntimeError):
    """A rank of a distributed run raised, died or did not finish in time."""


def _child(rank: int, world: int, fn: Callable, args: tuple, workdir: str, backend: str, timeout: float) -> None:
    torch.set_num_threads(1)
    out = Path(workdir) / f"rank{rank}.pkl"
    try:
        dist.init_process_group(
            backend, init_method=f"file://{workdir}/rendezvous", rank=rank, world_size=world,
            timeout=timedelta(seconds=timeout),
        )  # fmt: skip
        try:
            result = ("ok", fn(rank, world, *args))
        finally:
            dist.destroy_process_group()
    except BaseException as err:  # noqa: BLE001 - reported to the parent, which raises
        result = ("error", f"{type(err).__name__}: {err}\n{traceback.format_exc()}")
    out.write_bytes(pickle.dumps(result))


def run(world: int, fn: Callable, *args: Any, timeout: float = 120.0, backend: str = "gloo") -> list[Any]:
    """``[fn(0, world, *args), ..., fn(world-1, world, *args)]``, each in its own process of one group."""
    with tempfile.TemporaryDirectory(prefix="attnkit-cp-") as workdir:
        ctx = mp.start_processes(
            _child, args=(world, fn, args, workdir, backend, timeout), nprocs=world, join=False, start_method="spawn"
        )
        deadline = time.monotonic() + timeout + 30  # the group's own timeout fires first; this is the backstop
        try:
            while not ctx.join(timeout=1):
                if time.monotonic() > deadline:
                    raise RankFailed(f"a distributed run of {world} ranks did not finish within {timeout:.0f} s")
        except mp.ProcessRaisedException as err:
            raise RankFailed(str(err)) from None
        except mp.ProcessExitedException as err:
            raise RankFailed(f"rank {err.error_index} died (exit code {err.exit_code})") from None
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
        results = []
        for rank in range(world):
            path = Path(workdir) / f"rank{rank}.pkl"
            if not path.exists():
                raise RankFailed(f"rank {rank} exited without a result")
            status, value = pickle.loads(path.read_bytes())
            if status != "ok":
                raise RankFailed(f"rank {rank} failed: {value}")
            results.append(value)
        return results
