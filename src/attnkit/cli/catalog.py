"""``attnkit list`` and ``attnkit info``: what is in the catalogue."""

from __future__ import annotations

import argparse
import dataclasses

from ..api import info, mechanisms
from ..options import option_docs
from ..patterns import Pattern


def cmd_list(args: argparse.Namespace) -> int:
    rows = mechanisms(args.filter, pattern=args.pattern)
    if not rows:
        print(f"no mechanism matches {args.filter!r}" + (f" with pattern {args.pattern}" if args.pattern else ""))
        return 1
    pats = list(Pattern)
    header = ["mechanism", "family", *(p.short for p in pats), "exact", "state", "paths", "complexity", "paper"]
    table = [
        [
            i.name,
            i.family,
            *("✓" if p in i.patterns else "—" for p in pats),
            "yes" if i.exact else "no",
            i.state_kind or "—",
            ", ".join(i.paths) or "reference only",
            i.complexity.time,
            f"{i.paper.title} ({i.paper.year})",
        ]
        for i in rows
    ]
    widths = [max(len(r[c]) for r in [header, *table]) for c in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in [header, *table]]
    print(lines[0])
    print("-" * len(lines[0]))
    print("\n".join(lines[1:]))
    print(f"\n{len(rows)} mechanisms. NS/CS/NC/CC = noncausal/causal self/cross. 'attnkit info NAME' for details.")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    i = info(args.name)
    print(f"{i.name}  ({i.kind}, family: {i.family})")
    print(f"  paper:      {i.paper}")
    print(f"  patterns:   {', '.join(sorted(p.value for p in i.patterns))}")
    print(f"  exact:      {'yes (equals softmax attention up to rounding)' if i.exact else 'no'}")
    print(f"  trainable:  {'yes (use attnkit.create or attnkit.Attention)' if i.trainable else 'no'}")
    print(f"  state:      {i.state_kind or 'none'}")
    if i.spatial:
        print("  grid:       needs spatial_shape (tokens flattened row-major)")
    elif i.grid_dims:
        ranks = "/".join(f"{r}-D" for r in i.grid_dims)
        print(f"  grid form:  {ranks} with spatial_shape, in {', '.join(sorted(p.value for p in i.grid_patterns))}")
    print(f"  complexity: {i.complexity}")
    print(f"  paths:      reference, {', '.join(i.paths)}" if i.paths else "  paths:      reference")
    fields = dataclasses.fields(i.options)
    docs = option_docs(i.options)
    print("  options:" + ("" if fields else "    none"))
    for f in fields:
        print(f"    {f.name} = {f.default!r}" + (f"    # {docs[f.name]}" if f.name in docs else ""))
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "list",
        help="the capability matrix: every mechanism, its patterns, state and cost",
        description="Print every registered mechanism with the patterns it supports (NS CS NC CC),"
        " whether it is exact, its decoding state, fast paths, complexity and paper.",
    )
    p.add_argument("filter", nargs="?", default="*", help="shell wildcard on names, e.g. 'linear*' (default: all)")
    p.add_argument("--pattern", choices=[x.value for x in Pattern], help="only mechanisms supporting this pattern")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser(
        "info",
        help="one mechanism in detail: paper, patterns, paths, options with defaults",
        description="Show one mechanism's paper, patterns, state, paths and options (with defaults and meaning).",
    )
    p.add_argument("name", help="mechanism name, as in 'attnkit list'")
    p.set_defaults(func=cmd_info)
