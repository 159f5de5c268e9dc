"""The attnkit command line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from attnkit.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_list_prints_the_capability_matrix(capsys):
    code, out, _ = run(capsys, "list")
    assert code == 0
    lines = {line.split()[0]: line for line in out.splitlines() if line and not line.startswith(("-", "mechanism"))}
    assert "sliding_window" in lines and "softmax" in lines
    assert lines["sliding_window"].split()[3:7] == ["✓", "✓", "—", "—"]
    assert lines["softmax"].split()[2:6] == ["✓", "✓", "✓", "✓"]
    assert "NS" in out and "CC" in out and "Attention Is All You Need" in out


def test_list_filters(capsys):
    code, out, _ = run(capsys, "list", "s*", "--pattern", "noncausal_cross")
    assert code == 0 and "softmax" in out and "sigmoid" in out and "sliding_window" not in out and "linear" not in out
    code, out, _ = run(capsys, "list", "nothing*")
    assert code == 1 and "no mechanism matches" in out


def test_info_shows_options_with_their_meaning(capsys):
    code, out, _ = run(capsys, "info", "sliding_window")
    assert code == 0
    assert "window = 256" in out and "keys at distance < window" in out and "WindowCache" in out


def test_unknown_name_is_a_clear_error(capsys):
    code, _, err = run(capsys, "info", "slidingwindow")
    assert code == 2 and "Did you mean 'sliding_window'" in err


def test_demo_runs_a_small_table(capsys):
    code, out, err = run(capsys, "demo", "--lengths", "16", "32", "--runs", "1", "--mechanisms", "s*")
    assert code == 0
    assert "sliding_window" in out and "vs SDPA" in out and "[1/" in err
    rows = [line for line in out.splitlines() if line.startswith(("sigmoid", "sliding_window", "softmax"))]
    assert len(rows) == 3 * 2 * 2  # mechanisms x (NS, CS) x lengths


@pytest.mark.parametrize("bad", ["0", "-3", "ten"])
def test_demo_rejects_bad_lengths(capsys, bad):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--lengths", bad])
    assert exit_info.value.code == 2
    assert "expected a positive integer" in capsys.readouterr().err


def test_help_explains_every_subcommand():
    out = subprocess.run([sys.executable, "-m", "attnkit.cli", "--help"], capture_output=True, text=True, check=True)
    for word in ("list", "info", "demo", "capability matrix", "four"):
        assert word in out.stdout
    for cmd in ("list", "info", "demo"):
        sub = subprocess.run([sys.executable, "-m", "attnkit.cli", cmd, "--help"], capture_output=True, text=True)
        assert sub.returncode == 0 and len(sub.stdout.splitlines()) > 4
