"""Write the quality benchmark's reference statistics (``src/attnkit/bench/reference_scores.json``) from a store.

    PYTHONPATH=src .venv/bin/python scripts/build_reference_scores.py --db results.sqlite [--preset quick]

The reference is the scale every mechanism's compositional index is measured on (``attnkit.bench.scores``):
per preset and task, the mean and standard deviation of the reference mechanisms' scores. Build it
from a run of softmax and every shipped mechanism, with the seeds of the preset (2 on CPU, 3 on GPU),
e.g. ``attnkit bench quality --preset quick --seeds 0 1 --db results.sqlite``.

With ``--preset`` only that preset is replaced in the output file, the others are kept; without it,
every preset the store holds is written. This script is the source of truth: the JSON is its output,
never edited by hand.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from attnkit import __version__
from attnkit.bench.scores import MIN_MECHANISMS, REFERENCE_FILE, build_reference, ok_quality
from attnkit.bench.store import Store

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "src" / "attnkit" / "bench" / REFERENCE_FILE


def source_of(db: Path, rows: list[dict], runs: list[dict], preset: str) -> dict:
    """Where one preset's statistics came from: the store, its runs, revisions, versions and devices."""
    mine = [r for r in ok_quality(rows) if (r.get("extra") or {}).get("preset") == preset]
    run_ids = sorted({r["run_id"] for r in mine})
    return {
        "store": db.name,
        "built": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "attnkit_version": __version__,
        "runs": [
            {
                "run_id": r["run_id"],
                "command": r.get("command"),
                "started": time.strftime("%Y-%m-%d %H:%M", time.localtime(r["started_at"])),
            }
            for r in runs
            if r["run_id"] in run_ids
        ],
        "git_revs": sorted({str(r.get("git_rev")) for r in mine}),
        "torch_versions": sorted({str(r.get("torch_version")) for r in mine}),
        "devices": sorted({str(r.get("device")) for r in mine}),
        "rows": len(mine),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--db", required=True, help="the results store of the reference run")
    ap.add_argument("--preset", help="only this preset (default: every preset in the store)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"where to write (default: {DEFAULT_OUT})")
    args = ap.parse_args(argv)

    db = Path(args.db)
    with Store(db, readonly=True) as store:
        rows = store.results("quality")
        runs = store.runs()
    built = build_reference(rows)
    presets = built["presets"]
    if args.preset:
        if args.preset not in presets:
            print(
                f"{db}: no task of preset {args.preset!r} has {MIN_MECHANISMS} mechanisms with ok rows", file=sys.stderr
            )
            return 1
        presets = {args.preset: presets[args.preset]}
    if not presets:
        print(f"{db}: no task has enough mechanisms with ok quality rows", file=sys.stderr)
        return 1

    old = json.loads(args.out.read_text()) if args.out.exists() and args.preset else {}
    if old.get("format") != built["format"]:
        old = {}  # another format's presets are not kept
    out = {
        "format": built["format"],
        "header": {
            "written_by": "scripts/build_reference_scores.py",
            "written": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "attnkit_version": __version__,
            "sigma_floor": built["sigma_floor"],
            "about": "per preset and task: mean and population std of the reference mechanisms' scores (each the"
            " mean over its seeds); std is floored at std_floor: sigma_floor in the metric's unit (accuracy,"
            " exact_match, bits_per_byte), else sigma_floor times |mean| (std_raw is the measured one)",
        },
        "sources": {**(old.get("sources") or {}), **{p: source_of(db, rows, runs, p) for p in presets}},
        "presets": {**(old.get("presets") or {}), **presets},
    }
    args.out.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    for preset, tasks in sorted(presets.items()):
        for task, s in sorted(tasks.items()):
            floored = " (floored)" if s["std_floored"] else ""
            print(f"{preset:<6} {task:<16} v{s['version']}  mean {s['mean']:.4g}  std {s['std']:.4g}{floored}"
                  f"  {s['n_mechanisms']} mechanisms")  # fmt: skip
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
