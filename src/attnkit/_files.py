"""Writing the files users asked for (the report, the analysis page): parents created, and a path that cannot be
written raises an :class:`~attnkit.errors.AttnkitError` that says so, instead of an OSError traceback."""

from __future__ import annotations

from pathlib import Path

from .errors import AttnkitError


def write_text_file(path: str | Path, text: str, what: str) -> Path:
    """Write ``text`` (UTF-8) to ``path``, creating its folder; ``what`` names the file in the error."""
    out = Path(path)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
    except OSError as err:
        raise AttnkitError(f"cannot write the {what} to {out}: {err.strerror or err}; choose another --out") from None
    return out
