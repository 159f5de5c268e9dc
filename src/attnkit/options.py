"""Mechanism options: frozen dataclasses with defaults and a one-line comment per field.

``parse_options`` turns keyword arguments into the dataclass (unknown names and bad values raise
``InvalidOption``); ``option_docs`` reads each field's trailing comment so ``attnkit info`` can show it.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import io
import math
import re
import tokenize
from typing import Any

from .errors import InvalidOption, did_you_mean


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """A mechanism without options."""


# ---- bounds, declared once for every mechanism --------------------------------------------------------
# A larger value is a typo or an overflow: it would allocate, loop or index without end, or overflow
# inside torch (OverflowError, a wrapped int64). Mechanisms give their lower bounds (check_int's minimum).

MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit seed
MAX_TOKENS = 1 << 24  # lengths in tokens (16M, beyond any sequence one device attends over)
MAX_COUNT = 1 << 16  # any other count: features, landmarks, feature dims, layers
MAX_HEADS = 1 << 12  # heads of a layer or mechanism (models use at most a few hundred)
MAX_HEAD_DIM = 1 << 14  # width of one head (models use at most a few hundred)
MAX_WIDTH = 1 << 20  # model width of a layer (models use at most tens of thousands)
MAX_ITERATIONS = 1000  # iterative solvers converge in tens of steps (SOFT's Newton-Schulz: 20)

# The upper bound of every integer option, by name (one name means one thing in every mechanism);
# a name not listed here gets MAX_COUNT.
INT_LIMITS: dict[str, int] = {
    "seed": MAX_SEED,
    "window": MAX_TOKENS,
    "max_len": MAX_TOKENS,
    "chunk_size": MAX_TOKENS,
    "block_size": MAX_TOKENS,
    "query_heads": MAX_HEADS,
    "shared_heads": MAX_HEADS,
    "routed_heads": MAX_HEADS,
    "newton_iters": MAX_ITERATIONS,
}


def _type_words(f: dataclasses.Field) -> set[str]:
    text = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    return set(re.findall(r"[A-Za-z_]+", text)) - {"None", "Optional"}


def is_int_field(f: dataclasses.Field) -> bool:
    """Whether an options field holds an integer (``int`` or ``int | None``)."""
    return _type_words(f) == {"int"}


def int_limit(f: dataclasses.Field) -> int:
    """The largest value the integer option ``f`` takes."""
    return INT_LIMITS.get(f.name, MAX_COUNT)


def _check_bounds(mechanism: str, f: dataclasses.Field, value: Any) -> None:
    """The checks every option gets, whatever its mechanism checks after: integers within their declared
    bound (and 64 bits), floats finite (also inside per-head tuples)."""
    words, bad = _type_words(f), None
    if words == {"int"}:
        top = int_limit(f)
        if isinstance(value, bool) or not isinstance(value, int) or not -(2**63) <= value <= top:
            bad = f"an integer <= {top}"
    elif "float" in words:
        numbers = value if "tuple" in words and isinstance(value, tuple | list) else (value,)
        if not all(_finite(v) for v in numbers if isinstance(v, int | float) and not isinstance(v, bool)):
            bad = "a finite number" if "tuple" not in words else "finite numbers"
    if bad:
        raise InvalidOption(f"{mechanism} option {f.name}={value!r} is not valid; expected {bad}")


def _finite(value: float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def parse_options(cls: type, given: dict[str, Any], *, mechanism: str) -> Any:
    """Build ``cls`` from keyword arguments; ``None`` means "use the default"."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    valid = list(fields)
    for name in given:
        if name not in valid:
            listing = ", ".join(valid) if valid else "none"
            raise InvalidOption(
                f"{mechanism} has no option {name!r}.{did_you_mean(name, valid)} Valid options: {listing}"
            )
    given = {k: v for k, v in given.items() if v is not None}
    for name, value in given.items():
        _check_bounds(mechanism, fields[name], value)
    return cls(**given)


def check_size(label: str, value: Any, maximum: int) -> None:
    """A head count or width: an integer in [1, maximum] (not a bool, float or string)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= maximum:
        raise InvalidOption(f"{label}={value!r} is not valid; expected an integer in [1, {maximum}]")


@functools.cache
def option_docs(cls: type) -> dict[str, str]:
    """Field name -> the comment written after it in the dataclass source."""
    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    docs: dict[str, str] = {}
    for line in src.splitlines():
        try:
            tokens = list(tokenize.generate_tokens(io.StringIO(line + "\n").readline))
        except (tokenize.TokenError, SyntaxError):  # a line of a statement split over several lines
            continue
        names = [t for t in tokens if t.type == tokenize.NAME]
        comments = [t for t in tokens if t.type == tokenize.COMMENT]
        ops = [t for t in tokens if t.type == tokenize.OP]
        if names and comments and ops and ops[0].string == ":":
            docs[names[0].string] = comments[0].string.lstrip("# ").strip()
    return docs


# ---- value checks used by the options dataclasses' __post_init__ ----------------------------------


def check_choice(mechanism: str, name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise InvalidOption(
            f"{mechanism} option {name}={value!r} is not valid; expected one of {', '.join(choices)}."
            f"{did_you_mean(str(value), choices)}"
        )


def check_int(mechanism: str, name: str, value: Any, *, minimum: int = 1, maximum: int | None = None) -> None:
    """An integer in [minimum, maximum]; the maximum defaults to the option's declared bound (INT_LIMITS)."""
    maximum = INT_LIMITS.get(name, MAX_COUNT) if maximum is None else maximum
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        expected = f"an integer >= {minimum} and <= {maximum}"
        raise InvalidOption(f"{mechanism} option {name}={value!r} is not valid; expected {expected}")


def check_float(
    mechanism: str,
    name: str,
    value: Any,
    *,
    positive: bool = False,
    allow_none: bool = False,
    within: tuple[float, float] | None = None,
) -> None:
    """A finite number (> 0 with ``positive``; in the closed range ``within`` when given)."""
    if value is None and allow_none:
        return
    ok = isinstance(value, int | float) and not isinstance(value, bool) and _finite(value)
    if not ok or (positive and value <= 0) or (within and not within[0] <= value <= within[1]):
        kind = "a positive finite number" if positive else "a finite number"
        if within:
            kind = f"a number in [{within[0]:g}, {within[1]:g}]"
        raise InvalidOption(f"{mechanism} option {name}={value!r} is not valid; expected {kind}")
