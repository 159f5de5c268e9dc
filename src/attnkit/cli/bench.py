"""``attnkit bench speed|fidelity``, ``attnkit export``, ``attnkit report`` and ``attnkit demo`` (``bench quality``
and ``bench cp`` live in their own modules)."""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
import textwrap
from pathlib import Path

import torch

from ..bench.case import DTYPES, MODES
from ..bench.cases import MAX_TOKENS, PRESETS, only_baselines, peer_cases, select_mechanisms, speed_cases
from ..bench.derived import SDPA, baseline_of, curves, summarise
from ..bench.fidelity import fidelity_cases
from ..bench.runner import Budget, Summary, available_memory, run_cases
from ..bench.store import DEFAULT_DB, RESULT_COLUMNS, Store
from ..errors import AttnkitError
from ..options import MAX_HEAD_DIM, MAX_HEADS
from ..patterns import Pattern
from ..report import build_report

log = logging.getLogger(__name__)
MAX_RUNS = 10_000
DEMO_TASKS = ["mqar", "listops", "induction"]  # the demo's quality run: a few minutes of training
DEMO_QUALITY = ["softmax", "linear", "sliding_window"]

DEFAULT_REPORT = "attnkit-report.html"


def positive_int(text: str, limit: int = 2**31) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if not 0 < value <= limit:
        raise argparse.ArgumentTypeError(f"expected an integer from 1 to {limit}, got {text!r}")
    return value


def int_list(limit: int):
    """An argparse type for ``256,1024`` (use with nargs="+", so ``256 1024`` works too): a list of ints."""

    def parse(text: str) -> list[int]:
        return [positive_int(part, limit) for part in text.replace(",", " ").split()]

    return parse


def thread_count(text: str) -> int:
    cores = os.cpu_count() or 1
    value = positive_int(text, 1024)
    if value > cores:
        raise argparse.ArgumentTypeError(
            f"{value} threads on a machine with {cores} cores: threads would share cores and every timing would"
            f" measure the scheduler; choose 1 to {cores}"
        )
    return value


def flatten(lists: list[list[int]] | None) -> tuple[int, ...] | None:
    return tuple(x for part in lists for x in part) if lists else None


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _finish(summary: Summary) -> int:
    doubts = summary.doubt_text()
    if doubts:
        if set(summary.doubts) - {"spread"}:
            advice = "measure again on a quiet machine (--force; --wait-quiet pauses while it is busy)"
        else:  # the machine was quiet: these paths' timings vary by themselves
            advice = "more rounds narrow them (--force with a larger --runs)"
        print(f"Warning: {doubts}. Their rows are flagged in the store and the report; {advice}.", file=sys.stderr)
    for line in summary.failures[:20]:
        print(f"  failed: {line}", file=sys.stderr)
    if summary.interrupted:
        print("Stopped by Ctrl-C; every case measured so far is in the store (run again to resume).", file=sys.stderr)
        return 130
    return 0


def _budget(args: argparse.Namespace, preset) -> Budget:
    memory = int((args.memory_budget or 0) * 2**30)
    total = available_memory()
    if memory > total:
        raise AttnkitError(
            f"--memory-budget {args.memory_budget:g} GiB is more than the {total / 2**30:.1f} GiB of memory available"
            " now; choose less (default: 60% of what is available)"
        )
    return Budget(time_s=args.time_budget or preset.time_budget_s, memory_bytes=memory, timing_s=preset.timing_s)


def _speed(args: argparse.Namespace) -> Summary:
    preset = PRESETS[args.preset]
    device = args.device or preset.device
    if device == "cuda" and not torch.cuda.is_available():
        raise AttnkitError("--device cuda: no CUDA device is visible to torch (use --preset quick or cpu)")
    if args.threads:
        torch.set_num_threads(args.threads)
    lengths = flatten(args.lengths) or preset.lengths
    common = dict(
        patterns=tuple(args.patterns or [p.value for p in Pattern]),
        lengths=lengths,
        dtypes=tuple(args.dtypes or preset.dtypes),
        modes=tuple(args.modes or preset.modes),
        device=device,
        runs=args.runs or preset.runs,
        heads=args.heads,
        head_dim=args.head_dim,
    )
    cases = speed_cases(names=args.mechanisms, decode_lengths=flatten(args.decode_lengths) or preset.decode_lengths,
                        **common)  # fmt: skip
    budget = _budget(args, preset)
    if args.peers:
        from ..bench.peers import available_peers

        if not available_peers():
            raise AttnkitError("--peers: no peer package is installed; pip install 'attnkit[peers]'")
        cases += peer_cases(**{k: v for k, v in common.items() if k != "modes"}, names=args.mechanisms,
                            modes=tuple(m for m in common["modes"] if m != "decode"))  # fmt: skip
    if only_baselines(cases, args.mechanisms):
        chosen = ", ".join(select_mechanisms(args.mechanisms))
        print(f"Note: {chosen} has no case in this selection (patterns {', '.join(common['patterns'])}, modes"
              f" {', '.join(common['modes'])}): only the softmax baselines will be measured. 'attnkit info NAME'"
              " lists what a mechanism supports.", file=sys.stderr)  # fmt: skip
    with Store(args.db) as store:  # opened only after every argument was checked: bad input writes nothing
        print(f"{len(cases)} cases into {args.db} ({device}, {torch.get_num_threads()} threads)", flush=True)
        return run_cases(store, cases, force=args.force, budget=budget, show_progress=not args.no_progress,
                         wait_quiet=args.wait_quiet)  # fmt: skip


def cmd_speed(args: argparse.Namespace) -> int:
    summary = _speed(args)
    print(summary.text())
    return _finish(summary)


def _fidelity(args: argparse.Namespace, lengths: tuple[int, ...]) -> Summary:
    cases = fidelity_cases(args.mechanisms, lengths)
    with Store(args.db) as store:
        print(f"{len(cases)} fidelity cases into {args.db}", flush=True)
        return run_cases(store, cases, force=args.force, show_progress=not args.no_progress)


def cmd_fidelity(args: argparse.Namespace) -> int:
    summary = _fidelity(args, flatten(args.lengths) or PRESETS["cpu"].fidelity_lengths)
    print(summary.text())
    return _finish(summary)


def open_output(path: str, what: str):
    """Open ``path`` for writing, or say plainly why it cannot be (no traceback)."""
    try:
        return open(path, "w", newline="", encoding="utf-8")  # noqa: SIM115 - closed by the caller
    except OSError as err:
        raise AttnkitError(f"cannot write the {what} to {path}: {err.strerror or err}; choose another --out") from None


def cmd_export(args: argparse.Namespace) -> int:
    with Store(args.db, readonly=True) as store:
        rows = store.results(args.kind, latest=not args.all)
    out = sys.stdout if args.out == "-" else open_output(args.out, "export")
    try:
        if args.format == "json":
            json.dump(rows, out, indent=1, default=str)
            out.write("\n")
        else:
            writer = csv.DictWriter(out, fieldnames=["id", *RESULT_COLUMNS])
            writer.writeheader()
            for r in rows:
                writer.writerow({k: json.dumps(v, sort_keys=True) if isinstance(v, dict) else v for k, v in r.items()})
    finally:
        if out is not sys.stdout:
            out.close()
            print(f"{len(rows)} rows written to {args.out}", file=sys.stderr)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    path = build_report(args.db, args.out)
    print(f"report written to {path.resolve()}")
    return 0


def speed_summary(db: str) -> str:
    """A terminal table: each mechanism's latency and paired speed-up over SDPA at its largest measured T;
    a figure measured on a busy machine (or with a wide spread) is marked ``?``."""
    with Store(db, readonly=True) as store:
        rows = store.results("speed")
    cs = curves(rows)
    lines = [f"{'mechanism/path':<26}{'pattern':<17}{'mode':<7}{'T':>6}{'ms':>10}{'SDPA ms':>10}{'speed-up':>10}"]
    marked = False
    for c in cs:
        base = baseline_of(c, cs)
        if base is None or (c.mechanism, c.path) == SDPA:
            continue
        s = summarise(c, base)
        if not s.speedup:
            continue
        t = max(s.speedup)
        doubt = "?" if c.at(t, "doubtful") else ""
        marked = marked or bool(doubt)
        base_ms = c.at(t, "baseline_ms") or base.at(t, "ms")
        lines.append(
            f"{c.label:<26}{c.pattern:<17}{c.mode:<7}{t:>6}{c.at(t, 'ms'):>10.1f}{base_ms:>10.1f}"
            f"{s.speedup[t]:>9.2f}x{doubt}"
        )
    lines.append("speed-up: SDPA's time / the mechanism's, timed interleaved in the same process (> 1: faster).")
    if marked:
        lines.append("?: doubtful, measured while the machine was busy or with a wide spread (see the report).")
    return "\n".join(lines)


def cmd_demo(args: argparse.Namespace) -> int:
    args.preset, args.lengths, args.dtypes, args.modes, args.decode_lengths = "quick", None, None, None, None
    args.patterns, args.runs, args.threads, args.device, args.peers = None, None, None, None, False
    args.heads, args.head_dim = 8, 64
    args.time_budget, args.memory_budget, args.wait_quiet = None, None, False
    print(
        "attnkit demo: the quick benchmark (every mechanism and pattern, T = 256, 1K, 4K, forward, fp32),"
        " a fidelity sweep, a quick quality run (softmax, linear, sliding_window on MQAR, ListOps,"
        " induction heads), then the report.",
        flush=True,
    )
    speed = _speed(args)
    if speed.interrupted:
        return _finish(speed)
    print(speed.text(), flush=True)
    fid = _fidelity(args, PRESETS["quick"].fidelity_lengths)
    if fid.interrupted:
        return _finish(fid)
    print(fid.text())
    from .quality import quality_summary, run_quality

    qual = run_quality(args, tasks=DEMO_TASKS, names=DEMO_QUALITY, preset="quick", seeds=(0,))
    if qual.interrupted:
        return _finish(qual)
    print(qual.text())
    print("\n" + speed_summary(args.db) + "\n")
    print(quality_summary(args.db) + "\n")
    path = build_report(args.db, args.out)
    print(f"Report: {path.resolve()}\nResults: {Path(args.db).resolve()}")
    return _finish(speed) or _finish(fid) or _finish(qual)


def _store_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", default=DEFAULT_DB, metavar="PATH", help=f"results database (default: {DEFAULT_DB})")


def _sweep_args(p: argparse.ArgumentParser) -> None:
    _store_args(p)
    p.add_argument(
        "--mechanisms",
        nargs="+",
        default=["*"],
        metavar="NAME",
        help="mechanism names or wildcards, space- or comma-separated: 'lin*,sigmoid' (default: all)",
    )
    p.add_argument("--force", action="store_true", help="measure again cases already in the store")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_parsers(sub) -> None:
    bench = sub.add_parser(
        "bench",
        help="measure speed, memory and fidelity into the results store",
        description="Benchmarks. Results go to an SQLite store; 'attnkit report' draws them.",
    )
    bsub = bench.add_subparsers(dest="bench_command", metavar="WHAT", required=True)

    presets = "; ".join(
        f"{n}: T={','.join(map(str, p.lengths))}, {'/'.join(p.modes)}, {'/'.join(p.dtypes)}, {p.device}"
        for n, p in PRESETS.items()
    )
    p = bsub.add_parser(
        "speed",
        help="latency, memory, GFLOP/s and decoding cost of every mechanism vs SDPA",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.dedent(f"""\
        For each mechanism x fast path x supported pattern x T x dtype x mode: median and spread of the
        latency, peak memory (a fresh process per case), GFLOP/s and its share of this machine's
        matmul peak; decoding latency per token and state size. SDPA softmax and a naive softmax are
        measured in the same run. Cross patterns use Tq = T/4 queries. Cases already in the store are
        skipped (--force to redo); cases over the time or memory budget are recorded as skipped;
        Ctrl-C stops and keeps what was measured.

        presets: {presets}"""),
    )
    _sweep_args(p)
    p.add_argument("--preset", choices=sorted(PRESETS), default="quick", help="sizes and modes (default: quick)")
    p.add_argument("--patterns", nargs="+", choices=[x.value for x in Pattern], help="default: all four")
    p.add_argument("--lengths", nargs="+", type=int_list(MAX_TOKENS), metavar="T",
                   help="override the preset's lengths: 1024 4096 or 1024,4096")  # fmt: skip
    p.add_argument("--dtypes", nargs="+", choices=DTYPES, help="override the preset's dtypes")
    p.add_argument("--modes", nargs="+", choices=MODES, help="fwd, fwdbwd, decode (default: the preset's)")
    p.add_argument("--decode-lengths", nargs="+", type=int_list(MAX_TOKENS), metavar="T", help="contexts for decode")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: the preset's")
    p.add_argument("--heads", type=lambda t: positive_int(t, MAX_HEADS), default=8, metavar="H",
                   help="attention heads of every case (default: 8)")  # fmt: skip
    p.add_argument("--head-dim", type=lambda t: positive_int(t, MAX_HEAD_DIM), default=64, metavar="D",
                   help="head dimension of every case (default: 64)")  # fmt: skip
    p.add_argument(
        "--runs",
        type=lambda t: positive_int(t, MAX_RUNS),
        metavar="N",
        help="timed rounds per case at least (more until the spread is small; default: the preset's)",
    )
    p.add_argument("--threads", type=thread_count, help="torch threads, at most the cores (default: torch's choice)")
    p.add_argument("--wait-quiet", action="store_true",
                   help="before each case, wait (up to 10 min) while other processes keep the cores busy")  # fmt: skip
    p.add_argument("--time-budget", type=positive_float, metavar="S", help="seconds per case before skipping")
    p.add_argument(
        "--memory-budget",
        type=positive_float,
        metavar="GIB",
        help="peak GiB per case (default: 60%% of available memory)",
    )
    p.add_argument("--peers", action="store_true", help="also time installed peer packages (attnkit[peers])")
    p.set_defaults(func=cmd_speed)

    p = bsub.add_parser(
        "fidelity",
        help="relative error of each mechanism against exact softmax",
        description="Relative output error vs exact softmax over T, temperature (scales q) and"
        " each mechanism's knob (window, features...), on random and clustered inputs.",
    )
    _sweep_args(p)
    p.add_argument("--lengths", nargs="+", type=int_list(MAX_TOKENS), metavar="T",
                   help="default: 256 1024 4096 (or 256,1024,4096)")  # fmt: skip
    p.set_defaults(func=cmd_fidelity)

    from . import quality

    quality.add_parser(bsub, _sweep_args)
    from . import cp

    cp.add_parser(bsub)

    p = sub.add_parser(
        "export",
        help="write the stored results as CSV or JSON",
        description="Write result rows (the latest per case, or --all) as CSV or JSON.",
    )
    _store_args(p)
    p.add_argument("--format", choices=["csv", "json"], default="csv")
    p.add_argument("--out", default="-", metavar="FILE", help="output file (default: stdout)")
    p.add_argument(
        "--kind", choices=["speed", "decode", "fidelity", "peer", "quality", "cp"], help="only this kind of row"
    )
    p.add_argument("--all", action="store_true", help="every row, not just the latest per case")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "report",
        help="write the HTML report (one self-contained file)",
        description="Render scaling curves, speed-ups, efficiency lengths, memory, fidelity,"
        " decoding cost and peers from the store into one HTML file that needs no network.",
    )
    _store_args(p)
    p.add_argument("--out", default=DEFAULT_REPORT, metavar="FILE", help=f"default: {DEFAULT_REPORT}")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "demo",
        help="the quick benchmark, a fidelity sweep, a quick quality run and the report, in a few minutes",
        description="Run the quick preset (every mechanism and pattern, T = 256, 1K, 4K, forward,"
        " fp32, plus decoding), a small fidelity sweep and a quick quality run (softmax, linear and"
        " sliding_window trained on MQAR, ListOps and induction heads), print a summary and write the report.",
    )
    _sweep_args(p)
    p.add_argument("--out", default=DEFAULT_REPORT, metavar="FILE", help=f"report file (default: {DEFAULT_REPORT})")
    p.set_defaults(func=cmd_demo)
