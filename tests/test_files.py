"""The report and the analysis page are written through one helper: a path that cannot be written is an
AttnkitError naming the file and the path, never an OSError traceback."""

from __future__ import annotations

import pytest

from attnkit._files import write_text_file
from attnkit.errors import AttnkitError


def test_writes_the_text_and_creates_the_folder(tmp_path):
    out = write_text_file(tmp_path / "a" / "b" / "page.html", "<p>é</p>", "page")
    assert out.read_text(encoding="utf-8") == "<p>é</p>"


def test_a_path_under_a_file_is_refused_by_name(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(AttnkitError, match=r"cannot write the report to .*file.*choose another --out"):
        write_text_file(blocker / "report.html", "<p></p>", "report")
