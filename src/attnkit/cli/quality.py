"""``attnkit bench quality``: train small models on small tasks, one per mechanism, into the store."""

from __future__ import annotations

import argparse
from collections import defaultdict

from ..bench.case import Budget
from ..bench.quality import MODEL, quality_cases
from ..bench.runner import run_cases
from ..bench.store import Store

# per case: the worker is given 3x this before it is stopped (training, not one call)
QUALITY_BUDGET_S = {"quick": 120.0, "cpu": 900.0, "gpu": 1800.0}


def quality_scores(rows: list[dict]) -> dict[tuple[str, str], dict[str, list[float]]]:
    """(task, metric direction) -> mechanism -> the scores of its seeds, from ok quality rows."""
    out: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r["kind"] == "quality" and r["status"] == "ok" and r.get("score") is not None:
            extra = r.get("extra") or {}
            key = (str(extra.get("task")), "higher" if extra.get("higher_is_better", True) else "lower")
            out[key][r["mechanism"]].append(r["score"])
    return out


def quality_summary(db: str) -> str:
    """A terminal table: per task, each mechanism's mean score over its seeds and its difference from softmax."""
    with Store(db, readonly=True) as store:
        scores = quality_scores(store.results("quality"))
    lines = [f"{'task':<16}{'mechanism':<18}{'score':>9}{'vs softmax':>12}{'seeds':>7}"]
    for (task, _better), by_mech in sorted(scores.items()):
        base = by_mech.get("softmax")
        ref = sum(base) / len(base) if base else None
        for mech, vals in sorted(by_mech.items(), key=lambda kv: -sum(kv[1]) / len(kv[1])):
            mean = sum(vals) / len(vals)
            delta = f"{mean - ref:+.3f}" if ref is not None and mech != "softmax" else ""
            lines.append(f"{task:<16}{mech:<18}{mean:>9.3f}{delta:>12}{len(vals):>7}")
    lines.append("score: the task's metric on its test data (bits_per_byte: lower is better; others: higher).")
    return "\n".join(lines)


def run_quality(args: argparse.Namespace, *, tasks, names, preset: str, seeds) -> object:
    cases = quality_cases(tasks=tasks, names=names, preset=preset, seeds=tuple(seeds))
    budget = Budget(time_s=QUALITY_BUDGET_S[preset], timing_s=0.0)
    with Store(args.db) as store:
        print(f"{len(cases)} quality cases ({preset}) into {args.db}", flush=True)
        return run_cases(store, cases, force=args.force, budget=budget, show_progress=not args.no_progress)


def cmd_quality(args: argparse.Namespace) -> int:
    from .bench import _finish, flatten

    summary = run_quality(args, tasks=args.tasks, names=args.mechanisms, preset=args.preset,
                          seeds=flatten(args.seeds) or (0,))  # fmt: skip
    print(summary.text())
    print("\n" + quality_summary(args.db))
    return _finish(summary)


def seed_list(text: str) -> list[int]:
    """``0 1`` or ``0,1``: training seeds, integers in [0, 2**31)."""
    out = []
    for part in text.replace(",", " ").split():
        try:
            value = int(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer seed, got {part!r}") from None
        if not 0 <= value < 2**31:
            raise argparse.ArgumentTypeError(f"seeds are integers from 0 to {2**31 - 1}; got {part!r}")
        out.append(value)
    return out


def add_parser(bsub, sweep_args) -> None:
    from ..bench.tasks import list_tasks

    p = bsub.add_parser(
        "quality",
        help="train small models on small tasks: what each mechanism is worth, per pattern",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a small model whose attention is the mechanism under test on each task (MQAR,"
        " induction heads, ListOps, digits, forecasting, ...) from scratch, and store its test metric, learning"
        " curve, wall time, tokens/s and parameters. Same model, data, steps, seed and learning rate for every"
        " mechanism; a mechanism without a task's pattern is recorded 'not applicable'. The digits and forecast"
        " tasks read data files shipped with scikit-learn and vega_datasets: pip install 'attnkit[tasks]'.\n\n"
        f"tasks: {', '.join(list_tasks())}\npresets: {', '.join(MODEL)}",
    )
    sweep_args(p)
    p.add_argument("--preset", choices=sorted(MODEL), default="quick", help="data and model sizes (default: quick)")
    p.add_argument("--tasks", nargs="+", default=["*"], metavar="TASK", help="task names or wildcards (default: all)")
    p.add_argument("--seeds", nargs="+", type=seed_list, metavar="S", help="training seeds (default: 0)")
    p.set_defaults(func=cmd_quality)
