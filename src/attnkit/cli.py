"""The ``attnkit`` command: thin subcommands that call the library."""

from __future__ import annotations

import argparse
import logging
import sys
import textwrap

from . import __version__
from .errors import AttnkitError
from .patterns import Pattern

PROG_DESCRIPTION = """\
attnkit: attention mechanisms behind one interface.

Every mechanism has a plain-PyTorch reference and fast paths, declares which of the four
attention patterns it supports (noncausal_self, causal_self, noncausal_cross, causal_cross),
and can decode with state. Use 'attnkit list' to see them all.
"""


def _cmd_list(args: argparse.Namespace) -> int:
    from .api import mechanisms

    rows = mechanisms(args.filter, pattern=args.pattern)
    if not rows:
        print(f"no mechanism matches {args.filter!r}" + (f" with pattern {args.pattern}" if args.pattern else ""))
        return 1
    pats = list(Pattern)
    head = f"{'mechanism':<16}{'family':<17}" + "".join(f"{p.short:>4}" for p in pats)
    head += f"  {'exact':<6}{'state':<15}{'paths':<22}{'complexity':<20}paper"
    print(head)
    print("-" * len(head))
    for i in rows:
        marks = "".join(f"{'✓' if p in i.patterns else '—':>4}" for p in pats)
        state = i.state_kind or "—"
        paths = ", ".join(i.paths) or "reference only"
        print(
            f"{i.name:<16}{i.family:<17}{marks}  {'yes' if i.exact else 'no':<6}{state:<15}{paths:<22}"
            f"{i.complexity.time:<20}{i.paper.title} ({i.paper.year})"
        )
    print(f"\n{len(rows)} mechanisms. NS/CS/NC/CC = noncausal/causal self/cross. 'attnkit info NAME' for details.")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    import dataclasses

    from .api import info
    from .options import option_docs

    i = info(args.name)
    print(f"{i.name}  ({i.kind}, family: {i.family})")
    print(f"  paper:      {i.paper}")
    print(f"  patterns:   {', '.join(sorted(p.value for p in i.patterns))}")
    print(f"  exact:      {'yes (equals softmax attention up to rounding)' if i.exact else 'no'}")
    print(f"  trainable:  {'yes (use attnkit.create or attnkit.Attention)' if i.trainable else 'no'}")
    print(f"  state:      {i.state_kind or 'none'}")
    print(f"  complexity: {i.complexity}")
    print(f"  paths:      reference, {', '.join(i.paths)}" if i.paths else "  paths:      reference")
    fields = dataclasses.fields(i.options)
    docs = option_docs(i.options)
    print("  options:" + ("" if fields else "    none"))
    for f in fields:
        print(f"    {f.name} = {f.default!r}" + (f"    # {docs[f.name]}" if f.name in docs else ""))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    import torch

    from .bench.quick import format_table, speed_table

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise AttnkitError("--device cuda: no CUDA device is visible to torch")
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"Speed of each mechanism's fast path against SDPA softmax (forward, B=1, H=8, D=64, {args.dtype},"
        f" {where}, median of {args.runs}).",
        flush=True,
    )

    def progress(i: int, n: int, what: str) -> None:
        if i < n:
            print(f"  [{i + 1}/{n}] {what}", file=sys.stderr, flush=True)

    rows = list(
        speed_table(
            args.lengths,
            names=args.mechanisms,
            runs=args.runs,
            device=args.device,
            dtype=getattr(torch, args.dtype),
            progress=progress,
        )
    )
    print(format_table(rows))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attnkit", description=PROG_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"attnkit {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "list",
        help="the capability matrix: every mechanism, its patterns, state and cost",
        description="Print every registered mechanism with the patterns it supports (NS CS NC CC),"
        " whether it is exact, its decoding state, fast paths, complexity and paper.",
    )
    p.add_argument("filter", nargs="?", default="*", help="shell wildcard on names, e.g. 'linear*' (default: all)")
    p.add_argument("--pattern", choices=[x.value for x in Pattern], help="only mechanisms supporting this pattern")
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser(
        "info",
        help="one mechanism in detail: paper, patterns, paths, options with defaults",
        description="Show one mechanism's paper, patterns, state, paths and options (with defaults and meaning).",
    )
    p.add_argument("name", help="mechanism name, as in 'attnkit list'")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser(
        "demo",
        help="a quick speed table of every mechanism against SDPA softmax",
        description=textwrap.dedent(
            """\
            Time each mechanism's default fast path and SDPA softmax on the same random inputs
            (B=1, H=8, D=64, fp32, forward), interleaved so machine noise hits both alike, and print
            latency, speed-up over SDPA and achieved GFLOP/s."""
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--lengths",
        type=_positive_int,
        nargs="+",
        default=[1024, 2048, 4096],
        metavar="T",
        help="sequence lengths (default: 1024 2048 4096)",
    )
    p.add_argument("--mechanisms", default="*", metavar="GLOB", help="wildcard on mechanism names (default: all)")
    p.add_argument("--runs", type=_positive_int, default=5, help="timed runs per case (default: 5)")
    p.add_argument("--threads", type=_positive_int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where to run (default: cpu)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="input dtype")
    p.set_defaults(func=_cmd_demo)
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=[logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)],
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except AttnkitError as err:
        print(f"attnkit: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
