"""``attnkit bench cp``: context parallelism over W processes (gloo) on one sequence, into the store."""

from __future__ import annotations

import argparse
import sys

from ..bench.cases import MAX_TOKENS
from ..bench.store import Store
from ..options import MAX_HEAD_DIM, MAX_HEADS
from .bench import _store_args, flatten, int_list, positive_float, positive_int


def cmd_cp(args: argparse.Namespace) -> int:
    """``attnkit bench cp``: context parallelism over W processes (gloo), into the store."""
    from ..bench.cp import cp_cases, run_cp
    from ..mechanism import REGISTRY

    names = [n for part in args.mechanisms for n in part.replace(",", " ").split()]
    for name in names:
        REGISTRY.get(name)  # an unknown name fails here, before any process starts
    window = {"window": args.window} if args.window else {}
    mechanisms = [(n, window if n == "sliding_window" else {}) for n in names]
    cases = cp_cases(mechanisms, strategy=args.strategy, worlds=flatten(args.worlds), lengths=flatten(args.lengths),
                     pattern=args.pattern, layout=args.layout, batch=args.batch, heads=args.heads,
                     kv_heads=args.kv_heads or args.heads, head_dim=args.head_dim, dtype=args.dtype)  # fmt: skip
    with Store(args.db) as store:
        print(f"{len(cases)} context-parallel cases into {args.db}", flush=True)
        summary = run_cp(store, cases, runs=args.runs, check_max_tokens=args.check_max_tokens, force=args.force,
                         timeout=args.timeout, say=lambda line: print(line, flush=True))  # fmt: skip
    print(summary.text())
    for line in summary.failures[:20]:
        print(f"  failed: {line}", file=sys.stderr)
    return 0


def add_parser(bsub) -> None:
    p = bsub.add_parser(
        "cp",
        help="context parallelism: time, memory per rank and bytes sent, W processes on one sequence",
        description="Launch W gloo processes for each W, mechanism and growing T; each runs forward + backward of"
        " attnkit.distributed.attend on its shard. Stores the slowest rank's median step time, every rank's peak"
        " memory, the bytes each rank sends (measured, and the strategy's formula) and the max error against one"
        " process. Once a T fails (out of memory, a dead rank), larger T of that series are skipped.",
    )
    _store_args(p)
    p.add_argument("--mechanisms", nargs="+", default=["softmax,linear"], metavar="NAME",
                   help="mechanism names, space- or comma-separated (default: softmax, linear)")  # fmt: skip
    p.add_argument("--strategy", default="auto", help="auto (by family) or a strategy name: ring, lasp2, halo, sum,"
                   " ulysses")  # fmt: skip
    p.add_argument("--worlds", nargs="+", type=int_list(64), default=[[1, 2, 4]], metavar="W",
                   help="process counts (default: 1 2 4)")  # fmt: skip
    p.add_argument("--lengths", nargs="+", type=int_list(MAX_TOKENS), default=[[1024, 2048, 4096]], metavar="T",
                   help="sequence lengths, growing (default: 1024 2048 4096)")  # fmt: skip
    p.add_argument("--pattern", choices=["causal_self", "noncausal_self"], default="causal_self")
    p.add_argument("--layout", choices=["zigzag", "contiguous"], default="zigzag")
    p.add_argument("--batch", type=lambda t: positive_int(t, 1024), default=1, metavar="B")
    p.add_argument("--heads", type=lambda t: positive_int(t, MAX_HEADS), default=8, metavar="H",
                   help="query heads (default: 8; ulysses needs them divisible by every W)")  # fmt: skip
    p.add_argument("--kv-heads", type=lambda t: positive_int(t, MAX_HEADS), metavar="H", help="default: --heads")
    p.add_argument("--head-dim", type=lambda t: positive_int(t, MAX_HEAD_DIM), default=64, metavar="D")
    p.add_argument("--dtype", choices=["float32", "float64", "bfloat16"], default="float32")
    p.add_argument("--window", type=lambda t: positive_int(t, MAX_TOKENS), help="sliding_window's window")
    p.add_argument("--runs", type=lambda t: positive_int(t, 1000), default=5, metavar="N", help="timed steps")
    p.add_argument("--check-max-tokens", type=lambda t: positive_int(t, MAX_TOKENS), default=8192, metavar="T",
                   help="check against one process up to this T (default: 8192)")  # fmt: skip
    p.add_argument("--timeout", type=positive_float, default=600, metavar="S", help="seconds per case (default 600)")
    p.add_argument("--force", action="store_true", help="measure again cases already in the store")
    p.set_defaults(func=cmd_cp)
