"""``attnkit viz``: a PNG of which keys one query of a mechanism sees, and with what weight."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..api import info
from ..errors import InvalidOption
from ..patterns import Pattern
from ..viz import DEFAULT_LENGTH, save_pattern

DESCRIPTION = f"""\
Draw the attention pattern of MECHANISM as a PNG (matplotlib): the weights read out of the mechanism by
feeding one-hot values (every mechanism here is linear in v; one that is not is refused), for head H, on
random q and k drawn from --seed (a content-routed mechanism shows one draw).

1-D (default, --length {DEFAULT_LENGTH}): the whole T x T weight matrix (row = query, column = key) with the
query's row outlined, and that row as a strip below. Spatial (--spatial-shape 14x14 or 4x8x8, tokens
flattened row-major): the query's weights as a heatmap of the grid with its cell marked, one panel per
depth slice in 3-D. Light grey = a key the query does not see.

examples:
  attnkit viz sliding_window --option window=8
  attnkit viz dilated --length 96 --head 1 --query 40
  attnkit viz softmax --spatial-shape 14x14 --query 3,5 --out "my pictures/softmax #1.png"
  attnkit viz routing --option seed=3 --log
"""


def parse_value(text: str) -> Any:
    """An --option value: int, float, true/false, none, a comma list (a tuple of those), else the string."""
    if "," in text:
        return tuple(parse_value(part.strip()) for part in text.split(","))
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_options(items: list[str]) -> dict[str, Any]:
    """``["window=8", "seed=3"]`` -> ``{"window": 8, "seed": 3}`` (InvalidOption for a malformed item)."""
    out: dict[str, Any] = {}
    for item in items:
        name, eq, value = item.partition("=")
        name = name.strip()
        if not eq or not name:
            raise InvalidOption(f"--option {item!r} is not NAME=VALUE, e.g. --option window=8")
        if name in out:
            raise InvalidOption(f"--option {name} was given twice")
        out[name] = parse_value(value.strip())
    return out


def parse_grid(text: str) -> tuple[int, ...]:
    """``"14x14"`` -> ``(14, 14)``; ``"4x8x8"`` -> ``(4, 8, 8)``."""
    try:
        shape = tuple(int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a grid such as 14x14 or 4x8x8") from None
    if not 2 <= len(shape) <= 3 or any(s < 1 for s in shape):
        raise argparse.ArgumentTypeError(f"{text!r} is not a grid of 2 or 3 positive sizes, such as 14x14 or 4x8x8")
    return shape


def parse_query(text: str) -> int | tuple[int, ...]:
    """``"17"`` -> 17 (a token index); ``"3,5"`` -> ``(3, 5)`` (grid coordinates)."""
    try:
        parts = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a token index (17) or grid coordinates (3,5)") from None
    return parts[0] if len(parts) == 1 else parts


def cmd_viz(args: argparse.Namespace) -> int:
    if args.pattern is None:  # the mechanism's first pattern, in the order of attnkit.Pattern
        supported = info(args.mechanism).patterns
        args.pattern = next(p.value for p in Pattern if p in supported)
    out = Path(args.out) if args.out else Path(f"{args.mechanism}-{args.pattern}.png")
    written = save_pattern(
        args.mechanism,
        out,
        query=args.query,
        length=args.length,
        spatial_shape=args.spatial_shape,
        pattern=args.pattern,
        head=args.head,
        seed=args.seed,
        log_scale=args.log,
        options=parse_options(args.option),
    )
    print(f"wrote {written.resolve()}")
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "viz",
        help="a PNG of which keys one query sees, and with what weight (1-D or spatial)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("mechanism", metavar="MECHANISM", help="mechanism name, as in 'attnkit list'")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--length", type=int, metavar="T", help=f"tokens of a 1-D picture (default: {DEFAULT_LENGTH})")
    size.add_argument("--spatial-shape", type=parse_grid, metavar="HxW", help="a grid: 14x14, or DxHxW such as 4x8x8")
    p.add_argument("--query", type=parse_query, metavar="Q",
                   help="the query: a token index (17) or grid coordinates (3,5); default: the middle")  # fmt: skip
    p.add_argument("--pattern", choices=[x.value for x in Pattern],
                   help="attention pattern (default: the mechanism's first; noncausal_self if it has it)")  # fmt: skip
    p.add_argument("--head", type=int, default=0, metavar="H", help="which of the 4 heads (default: 0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random q, k (and parameters) (default: 0)")
    p.add_argument("--option", action="append", default=[], metavar="NAME=VALUE",
                   help="a mechanism option, repeatable; values parse as int, float, true/false, none, a comma list"
                   " (a tuple), else a string. 'attnkit info MECHANISM' lists the options")  # fmt: skip
    p.add_argument("--log", action="store_true", help="colour by log weight (small weights become visible)")
    p.add_argument("--out", metavar="FILE.png", help="where to write the PNG (default: MECHANISM-PATTERN.png here)")
    p.set_defaults(func=cmd_viz)
