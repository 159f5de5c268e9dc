"""The busy-machine acceptance check: the same small sweep quiet, then beside CPU-bound processes.

    uptime                                   # it must start quiet
    .venv/bin/python scripts/busy_machine_check.py [--hogs 2] [--out /tmp/busy-check]

Sweeps softmax, linear and sliding_window (causal_self, forward, T = 1K and 4K, decoding at 1K) into
``quiet.sqlite``, then again into ``loaded.sqlite`` while ``--hogs`` busy-loop processes run, and
prints, per case, the paired speed-up over SDPA in both, its change, and whether the loaded row is
flagged doubtful. The benchmark's promise: every loaded row is within 25% of its quiet figure, or
flagged. Not a test (it takes minutes and needs a quiet machine).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from attnkit.bench.store import Store

SWEEP = ["bench", "speed", "--mechanisms", "softmax,linear,sliding_window", "--patterns", "causal_self",
         "--modes", "fwd", "decode", "--lengths", "1024,4096", "--decode-lengths", "1024", "--no-progress"]  # fmt: skip
HOG = "while True:\n    pass\n"
TOLERANCE = 0.25


def sweep(db: Path) -> None:
    subprocess.run([sys.executable, "-m", "attnkit.cli", *SWEEP, "--db", str(db), "--force"], check=True)


def speedups(db: Path) -> dict[tuple, tuple[float, str | None]]:
    with Store(db, readonly=True) as st:
        rows = [r for r in st.results() if r["status"] == "ok" and r["kind"] in ("speed", "decode")]
    return {(r["mechanism"], r["path"], r["mode"], r["tokens"]): (r["speedup"], r["doubtful"]) for r in rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hogs", type=int, default=2, help="CPU-bound processes beside the loaded sweep")
    parser.add_argument("--out", default="/tmp/busy-check", help="folder for the two stores")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"load before the quiet sweep: {os.getloadavg()}", flush=True)
    sweep(out / "quiet.sqlite")
    hogs = [subprocess.Popen([sys.executable, "-c", HOG]) for _ in range(args.hogs)]
    try:
        sweep(out / "loaded.sqlite")
    finally:
        for h in hogs:
            h.kill()
    quiet, loaded = speedups(out / "quiet.sqlite"), speedups(out / "loaded.sqlite")
    print(f"\n{'case':<44}{'quiet':>8}{'loaded':>8}{'change':>8}  loaded row")
    broken = 0
    for key in sorted(quiet):
        if key not in loaded or (key[0], key[1]) == ("softmax", "sdpa"):
            continue
        (q, q_doubt), (l, l_doubt) = quiet[key], loaded[key]
        change = l / q - 1
        ok = abs(change) <= TOLERANCE or l_doubt
        broken += not ok
        verdict = "flagged: " + l_doubt.split(";")[0] if l_doubt else ("within 25%" if ok else "SILENTLY WRONG")
        note = "  (quiet row flagged too)" if q_doubt else ""
        print(f"{'/'.join(map(str, key)):<44}{q:>8.3f}{l:>8.3f}{change:>+8.0%}  {verdict}{note}")
    print(f"\n{broken} loaded figure(s) off by more than {TOLERANCE:.0%} without a flag")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
