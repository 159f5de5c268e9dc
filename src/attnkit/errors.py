"""The error hierarchy of attnkit.

Every error subclasses ``ValueError`` (or ``TypeError`` for a wrong dtype) so callers can catch them
with the built-in classes, and every message names what was given and what was expected.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class AttnkitError(ValueError):
    """Base class of every error attnkit raises on purpose."""


class ShapeError(AttnkitError):
    """A tensor has the wrong number of dimensions or sizes that do not fit together."""


class DTypeError(AttnkitError, TypeError):
    """A tensor has a dtype or device that the call cannot take."""


class UnsupportedPattern(AttnkitError):
    """The mechanism cannot express the requested attention pattern."""


class UnknownMechanism(AttnkitError):
    """No mechanism of that name is registered."""


class UnknownTask(AttnkitError):
    """No quality-benchmark task of that name is registered."""


class InvalidOption(AttnkitError):
    """An option, path or keyword has a name or value the mechanism does not accept."""


class MissingDependency(AttnkitError, ImportError):
    """An optional package that the call needs is not installed; the message says what to install."""


class ReferenceFallbackWarning(UserWarning):
    """``path="auto"`` ran the reference because no fast path takes the inputs (warned once per reason)."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """' Did you mean 'x'?' when a close match exists, else an empty string."""
    close = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.6)
    if not close:
        return ""
    return " Did you mean " + " or ".join(repr(c) for c in close) + "?"
