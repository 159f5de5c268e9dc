"""The attnkit command line."""

from __future__ import annotations

import json
import os
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
    # columns line up however long a cell is: each row's complexity and paper start under their headers
    header = next(line for line in out.splitlines() if line.startswith("mechanism"))
    for name, line in lines.items():
        if "mechanisms." in line:  # the closing sentence
            continue
        for column in ("complexity", "paper"):
            at = header.index(column)
            assert line[at - 2 : at] == "  " and line[at] != " ", (name, column, line)


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


def test_bench_report_export_end_to_end(tmp_path, capsys):
    db, html = tmp_path / "r.sqlite", tmp_path / "report.html"
    code, out, err = run(
        capsys,
        "bench",
        "speed",
        "--mechanisms",
        "sliding_window",
        "--patterns",
        "causal_self",
        "--lengths",
        "32",
        "64",
        "--modes",
        "fwd",
        "decode",
        "--decode-lengths",
        "16",
        "--runs",
        "1",
        "--db",
        str(db),
        "--no-progress",
    )
    assert code == 0, err
    assert "measured" in out and "0 failed" in out
    code, out, _ = run(capsys, "report", "--db", str(db), "--out", str(html))
    assert code == 0 and str(html) in out and html.stat().st_size > 5000
    code, out, _ = run(capsys, "export", "--db", str(db), "--format", "csv")
    lines = out.strip().splitlines()
    # (sliding_window dense, blocked, SDPA, naive) x 2 lengths + 1 decode row, after the header
    assert lines[0].startswith("id,schema_version,run_id") and len(lines) == 1 + 4 * 2 + 1
    code, out, _ = run(capsys, "export", "--db", str(db), "--format", "json", "--kind", "decode")
    rows = json.loads(out)
    assert len(rows) == 1 and rows[0]["state_bytes"] > 0 and rows[0]["mechanism"] == "sliding_window"


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--mechanisms", "nonesuch*"], "no mechanism matches 'nonesuch*'"),
        (["--lengths", "0"], "expected an integer from 1 to 4194304, got '0'"),
        (["--lengths", "12.5"], "expected a positive integer, got '12.5'"),
        (["--lengths", "256,9999999999"], "expected an integer from 1 to 4194304, got '9999999999'"),
        (["--threads", "4096"], "expected an integer from 1 to 1024"),
        (["--threads", str((os.cpu_count() or 1) + 1)], "threads would share cores"),
        (["--memory-budget", "1e9"], "more than the"),
        (["--runs", "99999999"], "expected an integer from 1 to 10000"),
        (["--patterns", "causal"], "invalid choice: 'causal'"),
        (["--time-budget", "-1"], "expected a positive number"),
    ],
)
def test_bench_bad_input_writes_nothing(tmp_path, capsys, argv, words):
    db = tmp_path / "never.sqlite"
    try:
        code = main(["bench", "speed", "--db", str(db), "--no-progress", *argv])
    except SystemExit as exit_info:  # argparse errors
        code = exit_info.code
    assert code == 2
    assert words in capsys.readouterr().err
    assert not db.exists()


def test_report_of_a_missing_store_is_a_clear_error(tmp_path, capsys):
    code, _, err = run(capsys, "report", "--db", str(tmp_path / "missing.sqlite"))
    assert code == 2 and "no results database" in err


def test_help_explains_every_subcommand():
    out = subprocess.run([sys.executable, "-m", "attnkit.cli", "--help"], capture_output=True, text=True, check=True)
    for word in ("list", "info", "demo", "bench speed", "bench fidelity", "report", "export", "four"):
        assert word in out.stdout
    # each subcommand's --help describes what it does, not just its flags
    says = {
        "list": "patterns it supports",
        "info": "options",
        "demo": "quick preset",
        "bench speed": "peak memory",
        "bench fidelity": "error vs exact softmax",
        "report": "HTML file",
        "export": "CSV or JSON",
    }
    for cmd, words in says.items():
        sub = subprocess.run(
            [sys.executable, "-m", "attnkit.cli", *cmd.split(), "--help"], capture_output=True, text=True
        )
        description = sub.stdout.split("\n\n")[1]  # the paragraph between usage and the options
        assert sub.returncode == 0 and words in " ".join(description.split()), (cmd, description)
