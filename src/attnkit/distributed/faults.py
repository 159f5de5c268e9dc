"""Faults of a distributed call: a rank that raises, dies or hangs must make every other rank stop with a clear
error within a timeout, never hang (issue 13, DESIGN §6).

Every collective of a strategy goes through :func:`collective`: it starts the op asynchronously and waits at most
``timeout`` seconds (``attend(timeout=...)``, default 60 s) for it, whatever the process group's own timeout. Then:

- the op did not complete in time (a peer hangs, or is stuck elsewhere): :class:`CollectiveTimeout`;
- the op failed (a peer died: gloo reports the closed connection at once): :class:`PeerLost`.

Either names the op, this rank and the timeout. After such a failure the process group is unusable: the pending op
keeps a gloo thread blocked, and the process would hang at exit (in the group's destructor) until the group's own
timeout — 30 minutes by default. So the first failure also arms an exit guard: when the interpreter exits, it
flushes the logs and ends the process with ``os._exit(1)`` instead of waiting on that thread.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import sys
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from ..errors import AttnkitError

log = logging.getLogger(__name__)

# what gloo / NCCL / c10d say when a peer went away or an op timed out (the parent of a launch tells these
# apart from a rank's own errors: a rank that raised ValueError is the culprit, not the ranks that lost it)
_COMM_TEXT = re.compile(r"gloo|nccl|c10d|connection|timed out|timeout|socket|peer", re.IGNORECASE)
_guard_armed = threading.Event()


class CommFailure(AttnkitError, RuntimeError):
    """A collective of a distributed call failed: a peer hangs, died or raised."""


class CollectiveTimeout(CommFailure):
    """A collective did not complete within the call's timeout (another rank hangs, or never reached it)."""


class PeerLost(CommFailure):
    """A collective failed because another rank left the group (it died or raised and exited)."""


def is_communication_error(err: BaseException) -> bool:
    """Whether ``err`` says a collective failed (as opposed to a rank's own error)."""
    if isinstance(err, CommFailure):
        return True
    return isinstance(err, RuntimeError | TimeoutError | ConnectionError) and bool(_COMM_TEXT.search(str(err)))


def _where(group: dist.ProcessGroup | None) -> str:
    if not dist.is_initialized():
        return "this process"
    return f"rank {dist.get_rank(group)} of {dist.get_world_size(group)}"


def wait(work: Any, *, what: str, timeout: float, group: dist.ProcessGroup | None = None) -> None:
    """Wait at most ``timeout`` seconds for an async collective ``work``; raise a :class:`CommFailure` naming
    ``what`` when it does not complete or fails."""
    try:
        work.wait(timeout=timedelta(seconds=timeout))
    except RuntimeError as err:
        arm_exit_guard()
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if re.search(r"timed out|timeout", text, re.IGNORECASE):
            raise CollectiveTimeout(
                f"{_where(group)}: {what} did not complete within {timeout:g} s: another rank raised, died or "
                f"hangs before reaching it (attend's timeout= sets this limit) [{text}]"
            ) from None
        raise PeerLost(f"{_where(group)}: {what} failed: another rank left the group [{text}]") from None


def collective(op: Callable[..., Any], *args: Any, what: str, timeout: float, group=None, **kwargs: Any) -> None:
    """``op(*args, group=group, async_op=True, **kwargs)`` (a ``torch.distributed`` collective), waited for at most
    ``timeout`` seconds (:func:`wait`)."""
    work = op(*args, group=group, async_op=True, **kwargs)
    wait(work, what=what, timeout=timeout, group=group)


def arm_exit_guard() -> None:
    """Once a collective failed: end the process with ``os._exit(1)`` at interpreter exit, instead of hanging in
    the process group's destructor on the op still pending (see the module docstring)."""
    if _guard_armed.is_set() or not dist.is_initialized():
        return
    _guard_armed.set()
    log.error("a collective failed: this process will exit with status 1 without waiting for the process group")
    atexit.register(_exit_now)


def _exit_now() -> None:
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(1)
