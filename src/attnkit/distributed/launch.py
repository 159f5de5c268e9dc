"""Run a function on W fresh processes joined in one process group (gloo on CPU): what ``attnkit bench cp`` and the
distributed tests use. ``run(world, fn, *args)`` calls ``fn(rank, world, *args)`` in every process and returns each
rank's (picklable) result, rank order.

It never hangs. The parent watches every rank; as soon as one fails it names the culprit, kills every rank and
raises :class:`RankFailed`:

- a rank that raised its own error (not a communication one) or died (``os._exit``, a signal) is the culprit at
  once; the ranks that lost it fail with :class:`~attnkit.distributed.faults.PeerLost` or a timeout, which is
  reported beside it;
- a rank that hangs: the others' collectives time out (the group's ``collective_timeout``, or attend's
  ``timeout=``); the ranks still running without a result then are the culprits;
- past ``timeout`` seconds in all, the ranks without a result are named as not finished.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..errors import AttnkitError
from .faults import is_communication_error

log = logging.getLogger(__name__)
GRACE_S = 3.0  # after a communication failure, how long to wait for a rank's own error before blaming the rest
POLL_S = 0.05


class RankFailed(AttnkitError, RuntimeError):
    """A rank of a distributed run raised, died or did not finish in time. ``rank``: the culprit (None when no
    single rank is); ``failures``: what each failed rank reported."""

    def __init__(self, message: str, rank: int | None = None, failures: dict[int, str] | None = None):
        super().__init__(message)
        self.rank = rank
        self.failures = failures or {}


@dataclass(frozen=True)
class _Failure:
    text: str  # one line: what happened
    comm: bool  # a communication failure (a symptom of another rank's fault), not the rank's own error
    detail: str = ""  # the traceback


def _child(rank: int, world: int, fn: Callable, args: tuple, workdir: str, backend: str, timeout: float) -> None:
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            backend, init_method=f"file://{workdir}/rendezvous", rank=rank, world_size=world,
            timeout=timedelta(seconds=timeout),
        )  # fmt: skip
        payload = pickle.dumps(("ok", fn(rank, world, *args)))
    except BaseException as err:  # noqa: BLE001 - reported to the parent, which raises
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        failure = _Failure(f"{type(err).__name__}: {first}", is_communication_error(err), traceback.format_exc())
        _write(workdir, rank, pickle.dumps(("error", failure)))
        os._exit(1)  # not destroy_process_group: with a collective pending it would wait for the group's timeout
    _write(workdir, rank, payload)
    dist.destroy_process_group()


def _write(workdir: str, rank: int, payload: bytes) -> None:
    """Atomically (the parent never reads half a file)."""
    tmp = Path(workdir) / f"rank{rank}.tmp"
    tmp.write_bytes(payload)
    tmp.replace(Path(workdir) / f"rank{rank}.pkl")


def _read(workdir: str, rank: int) -> tuple[str, Any] | None:
    path = Path(workdir) / f"rank{rank}.pkl"
    return pickle.loads(path.read_bytes()) if path.exists() else None


def _exit_text(code: int) -> str:
    return f"died (killed by signal {-code})" if code < 0 else f"died (exit code {code})"


def run(
    world: int,
    fn: Callable,
    *args: Any,
    timeout: float = 120.0,
    backend: str = "gloo",
    collective_timeout: float | None = None,
) -> list[Any]:
    """``[fn(0, world, *args), ..., fn(world-1, world, *args)]``, each in its own process of one group.

    ``timeout``: seconds for the whole run; ``collective_timeout``: the process group's timeout on each collective
    (default: ``timeout``). Raises :class:`RankFailed` naming the rank at fault; no process is left running."""
    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="attnkit-cp-") as workdir:
        group_timeout = collective_timeout or timeout
        procs = [
            ctx.Process(target=_child, args=(r, world, fn, args, workdir, backend, group_timeout), daemon=True)
            for r in range(world)
        ]
        for p in procs:
            p.start()
        try:
            results, failures = _watch(procs, workdir, time.monotonic() + timeout)
        finally:
            _kill(procs)
        if len(results) == world:
            return [results[r] for r in range(world)]
        raise _blame(world, results, failures, timeout)


def _watch(procs, workdir: str, deadline: float) -> tuple[dict[int, Any], dict[int, _Failure]]:
    """Poll the ranks until all finished, one failed (with a grace period for communication failures, whose cause
    may still report), or the deadline passed."""
    results: dict[int, Any] = {}
    failures: dict[int, _Failure] = {}
    first_failure = None
    while time.monotonic() < deadline:
        for rank, p in enumerate(procs):
            if rank in results or rank in failures:
                continue
            exited = p.exitcode is not None  # read before the file: a rank that wrote and exited is not "died"
            got = _read(workdir, rank)
            if got is not None:
                status, value = got
                (results if status == "ok" else failures)[rank] = value
            elif exited:
                failures[rank] = _Failure(_exit_text(p.exitcode), comm=False)
        if len(results) + len(failures) == len(procs):
            break
        if failures:
            first_failure = first_failure or time.monotonic()
            own = any(not f.comm for f in failures.values())
            if own or time.monotonic() - first_failure > GRACE_S:
                break
        time.sleep(POLL_S)
    return results, failures


def _blame(world: int, results: dict, failures: dict[int, _Failure], timeout: float) -> RankFailed:
    pending = [r for r in range(world) if r not in results and r not in failures]
    own = [r for r, f in sorted(failures.items()) if not f.comm]
    texts = {r: f.text for r, f in failures.items()}
    others = "; ".join(f"rank {r}: {f.text}" for r, f in sorted(failures.items()) if r not in own)
    if own:
        culprit = own[0]
        lines = [f"rank {r} {'' if failures[r].text.startswith('died') else 'raised '}{failures[r].text}" for r in own]
        message = "; ".join(lines) + (f" (then {others})" if others else "")
        detail = failures[culprit].detail
    elif failures:  # only communication failures: the ranks that never reported are the ones that hang
        culprit = pending[0] if pending else min(failures)
        hung = ", ".join(map(str, pending))
        message = (f"rank{'s' if len(pending) > 1 else ''} {hung} hung: no result while the others' collectives "
                   f"failed ({others})" if pending else f"every rank failed to communicate ({others})")  # fmt: skip
        detail = ""
    else:
        culprit = pending[0] if pending else None
        message = f"ranks {', '.join(map(str, pending))} did not finish within {timeout:g} s (killed)"
        detail = ""
        texts.update({r: "did not finish" for r in pending})
    log.error("distributed run of %d ranks failed: %s", world, message)
    return RankFailed(message + (f"\n{detail}" if detail else ""), rank=culprit, failures=texts)


def _kill(procs) -> None:
    """Kill every rank still running and reap them all (nothing is left behind)."""
    for p in procs:
        if p.is_alive():
            p.kill()
    for p in procs:
        p.join(timeout=10)
