"""The results store: refuses foreign files, survives concurrent writers, kill -9 and Ctrl-C."""

from __future__ import annotations

import hashlib
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from attnkit.bench.cases import speed_cases
from attnkit.bench.store import SCHEMA_VERSION, Store, StoreError

SMALL_SWEEP = [
    "bench",
    "speed",
    "--mechanisms",
    "linear",
    "--patterns",
    "causal_self",
    "noncausal_self",
    "--modes",
    "fwd",
    "--runs",
    "2",
    "--no-progress",
]


def attnkit(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "attnkit.cli", *args], capture_output=True, text=True, **kw)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_roundtrip_and_environment_on_every_row(tmp_path):
    db = tmp_path / "r.sqlite"
    with Store(db) as st:
        run = st.start_run(
            "run1", {"git_rev": "abc", "torch_version": "2.x", "device": "cpu0", "threads": 2, "seed": 0}, "test"
        )
        st.add(
            run,
            {
                "kind": "speed",
                "case_key": "k1",
                "mechanism": "m",
                "status": "ok",
                "median_ms": 1.5,
                "options": {"window": 4},
            },
        )
        st.finish_run(run)
        assert st.done("k1") and not st.done("k2")
        (row,) = st.results()
    assert row["options"] == {"window": 4} and row["schema_version"] == SCHEMA_VERSION
    assert (row["git_rev"], row["torch_version"], row["device"], row["threads"], row["seed"]) == (
        "abc",
        "2.x",
        "cpu0",
        2,
        0,
    )
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


@pytest.mark.parametrize("kind", ["text", "foreign-sqlite", "newer-schema", "directory"])
def test_refuses_files_that_are_not_an_attnkit_store(tmp_path, kind):
    db = tmp_path / "x.sqlite"
    if kind == "text":
        db.write_text("hello, not a database\n" * 10)
    elif kind == "foreign-sqlite":
        con = sqlite3.connect(db)
        con.execute("CREATE TABLE t (x)")
        con.commit()
        con.close()
    elif kind == "newer-schema":
        Store(db).close()
        con = sqlite3.connect(db)
        con.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
        con.close()
    else:
        db.mkdir()
    before = digest(db) if db.is_file() else None
    with pytest.raises(StoreError) as err:
        Store(db)
    assert str(db) in str(err.value)
    if before:
        assert digest(db) == before, "the file must be left untouched"
    res = attnkit(*SMALL_SWEEP, "--lengths", "16", "--db", str(db))
    assert res.returncode == 2 and "attnkit: error:" in res.stderr
    if before:
        assert digest(db) == before


WRITER = textwrap.dedent("""
    import sys
    from attnkit.bench.store import Store
    db, name, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    with Store(db) as st:
        run = st.start_run(name, {"device": name}, "writer")
        for i in range(n):
            st.add(run, {"kind": "speed", "case_key": f"{name}-{i}", "mechanism": name, "status": "ok",
                         "median_ms": float(i)})
        st.finish_run(run)
""")


def test_two_processes_writing_at_once(tmp_path):
    db = tmp_path / "shared.sqlite"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(db), name, "300"]) for name in ("a", "b")]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    counts = dict(con.execute("SELECT mechanism, COUNT(*) FROM results GROUP BY mechanism").fetchall())
    assert counts == {"a": 300, "b": 300}
    assert con.execute("SELECT COUNT(*) FROM runs WHERE status = 'finished'").fetchone()[0] == 2


def _wait_for_rows(db: Path, n: int, timeout: float = 120) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if db.exists():
            try:
                with sqlite3.connect(db, timeout=5) as con:
                    rows = con.execute("SELECT COUNT(*) FROM results").fetchone()[0]
                if rows >= n:
                    return rows
            except sqlite3.OperationalError:
                pass
        time.sleep(0.2)
    raise AssertionError(f"fewer than {n} rows after {timeout} s")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["kill-9", "ctrl-c"])
def test_interrupted_sweep_keeps_its_rows_and_resumes(tmp_path, sig):
    db = tmp_path / "k.sqlite"
    lengths = ["--lengths", "64", "128", "256", "512"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "attnkit.cli", *SMALL_SWEEP, *lengths, "--db", str(db)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    _wait_for_rows(db, 3)
    os.killpg(proc.pid, sig) if sig == signal.SIGKILL else proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    with sqlite3.connect(db) as con:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        measured = con.execute("SELECT COUNT(*) FROM results WHERE status = 'ok' AND median_ms > 0").fetchone()[0]
        # final results: measured, or skipped for a reason (a loaded machine may trip the time budget)
        kept = con.execute("SELECT COUNT(DISTINCT case_key) FROM results WHERE status IN ('ok', 'skipped')").fetchone()[
            0
        ]
        status = con.execute("SELECT status FROM runs").fetchone()[0]
    assert measured >= 3
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and status == "interrupted" and "Ctrl-C" in err
    else:
        assert status == "running"  # killed: nobody could mark it
    # resume: what is in the store is skipped, the rest is measured
    res = attnkit(*SMALL_SWEEP, *lengths, "--db", str(db))
    assert res.returncode == 0, res.stderr
    assert f"{kept} already in the store" in res.stdout
    with sqlite3.connect(db) as con:
        total = con.execute(
            "SELECT COUNT(DISTINCT case_key) FROM results WHERE status IN ('ok', 'skipped')"
        ).fetchone()[0]
    expected = speed_cases(names="linear", patterns=("causal_self", "noncausal_self"), lengths=(64, 128, 256, 512))
    assert total == len(expected)  # linear's paths, SDPA and naive softmax, for 2 patterns x 4 lengths


def test_reading_an_empty_file_says_so(tmp_path):
    db = tmp_path / "empty.sqlite"
    db.touch()
    with pytest.raises(StoreError, match="is empty"):
        Store(db, readonly=True)
    res = attnkit("report", "--db", str(db), "--out", str(tmp_path / "r.html"))
    assert res.returncode == 2 and "is empty" in res.stderr and not (tmp_path / "r.html").exists()
