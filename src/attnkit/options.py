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
import tokenize
from typing import Any

from .errors import InvalidOption, did_you_mean


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """A mechanism without options."""


def parse_options(cls: type, given: dict[str, Any], *, mechanism: str) -> Any:
    """Build ``cls`` from keyword arguments; ``None`` means "use the default"."""
    valid = [f.name for f in dataclasses.fields(cls)]
    for name in given:
        if name not in valid:
            listing = ", ".join(valid) if valid else "none"
            raise InvalidOption(
                f"{mechanism} has no option {name!r}.{did_you_mean(name, valid)} Valid options: {listing}"
            )
    return cls(**{k: v for k, v in given.items() if v is not None})


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
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum or (maximum and value > maximum):
        expected = f"an integer >= {minimum}" + (f" and <= {maximum}" if maximum else "")
        raise InvalidOption(f"{mechanism} option {name}={value!r} is not valid; expected {expected}")


MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit seed


def check_float(mechanism: str, name: str, value: Any, *, positive: bool = False, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (positive and value <= 0):
        kind = "a positive finite number" if positive else "a finite number"
        raise InvalidOption(f"{mechanism} option {name}={value!r} is not valid; expected {kind}")
