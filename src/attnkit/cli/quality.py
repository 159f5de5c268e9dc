"""``attnkit bench quality``: train small models on small tasks, one per mechanism, into the store."""

from __future__ import annotations

import argparse

import torch

from ..bench.case import Budget
from ..bench.quality import LR_GRID, MODEL, quality_cases
from ..bench.runner import run_cases
from ..bench.scores import (
    compositional_index,
    deltas_vs_softmax,
    load_reference,
    mechanism_means,
    presets_of,
    reference_tasks,
    seed_scores,
    task_info,
)
from ..bench.store import Store
from ..errors import AttnkitError
from ..nn.blocks import POSITIONS

# per case: the worker is given 3x this before it is stopped (training, not one call)
QUALITY_BUDGET_S = {"quick": 120.0, "cpu": 900.0, "gpu": 1800.0}


def ci_summary(rows: list[dict]) -> list[str]:
    """Lines: per preset and pattern, each mechanism's compositional index against the shipped reference
    statistics (best first), or a line saying that none ship for the preset."""
    reference = load_reference()
    lines = []
    for preset in presets_of(rows):
        if not reference_tasks(reference, preset):
            lines.append(f"no compositional index for the {preset} preset: no reference statistics ship for it")
            continue
        lines.append(
            f"compositional index ({preset} preset; mean z over the tasks with a reference, higher is better):"
        )
        lines.append(f"{'pattern':<16}{'mechanism':<18}{'CI':>9}  tasks")
        for pattern, by_mech in compositional_index(rows, reference, preset).items():
            for mech, (ci, tasks) in sorted(by_mech.items(), key=lambda kv: (-kv[1][0], kv[0])):
                lines.append(f"{pattern:<16}{mech:<18}{ci:>+9.2f}  {', '.join(tasks)}")
    return lines


def quality_summary(db: str) -> str:
    """A terminal table: per preset and task, each mechanism's mean score over its seeds and its difference
    from softmax over the seeds both ran; then each mechanism's compositional index per pattern, where
    reference statistics ship for the preset."""
    with Store(db, readonly=True) as store:
        rows = store.results("quality")
    lines = [f"{'preset':<8}{'task':<16}{'mechanism':<22}{'score':>9}{'vs softmax':>12}{'seeds':>7}"]
    for preset in presets_of(rows):
        means, deltas = mechanism_means(rows, preset), deltas_vs_softmax(rows, preset)
        seeds = seed_scores(rows, preset)
        higher = {key: info["higher_is_better"] for key, info in task_info(rows, preset).items()}
        for key in sorted(means):
            _pattern, task, _version = key
            order = sorted(means[key].items(), key=lambda kv: -kv[1] if higher[key] else kv[1])
            for mech, mean in order:
                delta = f"{deltas[key][mech][0]:+.3g}" if mech in deltas.get(key, {}) else ""
                lines.append(f"{preset:<8}{task:<16}{mech:<22}{mean:>9.4g}{delta:>12}{len(seeds[key][mech]):>7}")
    lines.append("score: the task's metric on its test data (bits_per_byte, mse: lower is better; others: higher).")
    return "\n".join(lines + [""] + ci_summary(rows))


def run_quality(args: argparse.Namespace, *, tasks, names, preset: str, seeds, lrs=None, positions="learned") -> object:
    device = "cuda" if preset == "gpu" else "cpu"  # the gpu preset's sizes take hours on a CPU
    if device == "cuda" and not torch.cuda.is_available():
        raise AttnkitError("--preset gpu: no CUDA device is visible to torch (use --preset quick or cpu)")
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    cases = quality_cases(tasks=tasks, names=names, preset=preset, seeds=tuple(seeds), lrs=lrs, device=device,
                          positions=positions)  # fmt: skip
    budget = Budget(time_s=QUALITY_BUDGET_S[preset], timing_s=0.0)
    with Store(args.db) as store:
        print(f"{len(cases)} quality cases ({preset}) into {args.db}", flush=True)
        return run_cases(store, cases, force=args.force, budget=budget, show_progress=not args.no_progress)


def cmd_quality(args: argparse.Namespace) -> int:
    from .bench import _finish, flatten

    lrs = None if args.lr_sweep is None else (flatten(args.lr_sweep) or LR_GRID)  # given alone: the grid
    summary = run_quality(args, tasks=args.tasks, names=args.mechanisms, preset=args.preset,
                          seeds=flatten(args.seeds) or (0,), lrs=lrs, positions=args.positions)  # fmt: skip
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


def learning_rates(text: str) -> list[float]:
    """``1e-3 3e-3`` or ``1e-3,3e-3``: learning rates, floats in (0, 1)."""
    out = []
    for part in text.replace(",", " ").split():
        try:
            value = float(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a learning rate such as 1e-3, got {part!r}") from None
        if not 0 < value < 1:  # also refuses nan and inf
            raise argparse.ArgumentTypeError(f"learning rates are floats in (0, 1); got {part!r}")
        out.append(value)
    return out


def add_parser(bsub, sweep_args) -> None:
    from ..bench.tasks import list_tasks
    from .bench import thread_count

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
    p.add_argument("--threads", type=thread_count, help="torch threads per case, at most the cores (default: torch's"
                   " choice; on a busy 2-core machine 1 trains many times faster than 2)")  # fmt: skip
    p.add_argument("--positions", choices=POSITIONS, default="learned",
                   help="the backbone's positions (default: learned, untrained past the training length; rope or"
                   " none to test length generalisation)")  # fmt: skip
    grid = " ".join(f"{lr:g}" for lr in LR_GRID)
    p.add_argument(
        "--lr-sweep",
        nargs="*",
        type=learning_rates,
        metavar="LR",
        help="train every case at each learning rate and keep the best per task, mechanism and seed, as Zoology"
        f" and MAD do (meant for the gpu preset); alone: Zoology's grid {grid}. Default: each task's one rate,"
        " chosen once with softmax",
    )
    p.set_defaults(func=cmd_quality)
