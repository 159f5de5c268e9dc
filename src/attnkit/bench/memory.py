"""Peak memory of one attention call, measured inside the worker process of its case (``worker.py``).

CPU: each case has a fresh process. After the inputs are built, the peak resident set is reset
(``/proc/self/clear_refs``) and the call's peak is the high-water mark (``VmHWM``) minus the resident
set just before the call, so the interpreter, torch and the inputs are not counted. ``ru_maxrss``
alone would not do: a child inherits its parent's peak across fork and exec, so a child of a big
process reports nothing. Where /proc is missing, ``ru_maxrss`` minus the baseline is the fallback.
GPU: ``torch.cuda.max_memory_allocated`` around the call, minus what was allocated before it.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


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
