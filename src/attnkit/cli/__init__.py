"""The ``attnkit`` command: thin subcommands that call the library."""

from __future__ import annotations

import argparse
import logging
import sys

from .. import __version__
from ..errors import AttnkitError
from . import analyze, bench, catalog, viz

PROG_DESCRIPTION = """\
attnkit: attention mechanisms behind one interface.

Every mechanism has a plain-PyTorch reference and fast paths, declares which of the four
attention patterns it supports (noncausal_self, causal_self, noncausal_cross, causal_cross),
and can decode with state.

  attnkit list                 the capability matrix of every mechanism
  attnkit info NAME            one mechanism: paper, patterns, paths, options
  attnkit viz NAME             a PNG of which keys one query sees, and with what weight
  attnkit bench speed          latency, memory and decoding cost vs SDPA, into an SQLite store
  attnkit bench fidelity       distance of each mechanism from exact softmax
  attnkit report               the HTML report of everything in the store
  attnkit export               the stored results as CSV or JSON
  attnkit demo                 quick benchmark + fidelity + report, in a few minutes
  attnkit analyze              one HTML page of a real model's attention: sinks, no-op heads, roles
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attnkit", description=PROG_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"attnkit {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    catalog.add_parsers(sub)
    viz.add_parsers(sub)
    bench.add_parsers(sub)
    analyze.add_parsers(sub)
    return parser


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
    except KeyboardInterrupt:
        print("attnkit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
