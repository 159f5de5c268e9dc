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
from attnkit.bench.store import SCHEMA_VERSION, Run, Store, StoreError

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


def test_a_store_being_created_by_another_process_is_opened(tmp_path):
    """Another process has written the SQLite header (WAL mode) but not yet its tables: not refused as foreign."""
    db = tmp_path / "new.sqlite"
    con = sqlite3.connect(db)
    con.execute("PRAGMA journal_mode = WAL")
    con.close()
    with Store(db) as st:
        assert st.con.execute("PRAGMA application_id").fetchone()[0] != 0
    foreign = tmp_path / "foreign.sqlite"
    con = sqlite3.connect(foreign)
    con.execute("CREATE TABLE notes (x)")
    con.close()
    with pytest.raises(StoreError, match="not an attnkit results database"):
        Store(foreign)


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
        # a shell starts background jobs with SIGINT ignored, and Python keeps an ignored SIGINT ignored:
        # give the sweep the default disposition so that Ctrl-C reaches it wherever the suite runs
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
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
    with sqlite3.connect(db) as con:  # every case has a row (on a loaded machine one may time out: a row too)
        total = con.execute("SELECT COUNT(DISTINCT case_key) FROM results").fetchone()[0]
    expected = speed_cases(names="linear", patterns=("causal_self", "noncausal_self"), lengths=(64, 128, 256, 512))
    assert total == len(expected)  # linear's paths, SDPA and naive softmax, for 2 patterns x 4 lengths


def test_reading_an_empty_file_says_so(tmp_path):
    db = tmp_path / "empty.sqlite"
    db.touch()
    with pytest.raises(StoreError, match="is empty"):
        Store(db, readonly=True)
    res = attnkit("report", "--db", str(db), "--out", str(tmp_path / "r.html"))
    assert res.returncode == 2 and "is empty" in res.stderr and not (tmp_path / "r.html").exists()


@pytest.mark.parametrize("name", ["other_app.db#x", "other_app.db?mode=ro", "a%20b.db", "spaced name.db"])
def test_db_paths_with_uri_characters_are_taken_literally(tmp_path, name):
    """``--db 'other_app.db#x'`` once wrote into other_app.db (the path went into an SQLite URI unquoted)."""
    other = tmp_path / "other_app.db"
    con = sqlite3.connect(other)  # another program's database, beside ours
    con.execute("CREATE TABLE t (x)")
    con.commit()
    con.close()
    before = digest(other)
    db = tmp_path / name
    with Store(db) as st:
        run = st.start_run("r", {}, "test")
        st.add(run, {"kind": "speed", "case_key": "k", "mechanism": "m", "status": "ok"})
    assert db.is_file() and digest(other) == before
    with Store(db, readonly=True) as st:
        assert len(st.results()) == 1


def _v1_store(path: Path) -> None:
    """A store as attnkit's schema 1 wrote it (no paired timing, no load columns, no run pid)."""
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE runs (run_id TEXT PRIMARY KEY, started_at REAL NOT NULL, finished_at REAL,"
                " status TEXT NOT NULL, command TEXT, device TEXT, threads INTEGER)")  # fmt: skip
    con.execute("CREATE TABLE results (id INTEGER PRIMARY KEY AUTOINCREMENT, schema_version INTEGER NOT NULL,"
                " run_id TEXT NOT NULL, created_at REAL NOT NULL, kind TEXT NOT NULL, case_key TEXT NOT NULL,"
                " mechanism TEXT NOT NULL, status TEXT NOT NULL, median_ms REAL, max_ms REAL, options TEXT,"
                " extra TEXT)")  # fmt: skip
    con.execute("INSERT INTO runs VALUES ('old', 1, 2, 'finished', 'x', 'cpu', 2)")
    con.execute("INSERT INTO results (schema_version, run_id, created_at, kind, case_key, mechanism, status,"
                " median_ms, max_ms) VALUES (1, 'old', 1, 'speed', 'k', 'linear', 'ok', 3.0, 4.0)")  # fmt: skip
    con.execute("PRAGMA application_id = 1096043313")
    con.execute("PRAGMA user_version = 1")
    con.commit()
    con.close()


def test_an_older_store_is_read_as_is_and_upgraded_when_written(tmp_path):
    db = tmp_path / "v1.sqlite"
    _v1_store(db)
    with Store(db, readonly=True) as st:
        (row,) = st.results()
        assert row["median_ms"] == 3.0 and row["speedup"] is None and row["doubtful"] is None
    with Store(db) as st:
        run = st.start_run("new", {}, "test")
        st.add(run, {"kind": "speed", "case_key": "k2", "mechanism": "m", "status": "ok", "speedup": 2.0})
        assert [r["speedup"] for r in st.results()] == [None, 2.0]
    assert sqlite3.connect(db).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_a_read_only_store_is_a_message_not_a_traceback(tmp_path):
    if os.geteuid() == 0:  # root writes through file modes: make the folder and file immutable another way
        ro = tmp_path / "ro.sqlite"
        Store(ro).close()
        with Store(ro, readonly=True) as st:  # opened read-only: a write is refused with a message
            with pytest.raises(StoreError, match="read-only"):
                st.add(Run("x", {}), {"kind": "speed", "case_key": "k", "mechanism": "m", "status": "ok"})
        return
    ro = tmp_path / "ro.sqlite"
    Store(ro).close()
    ro.chmod(0o444)
    res = attnkit(*SMALL_SWEEP, "--lengths", "16", "--db", str(ro))
    assert res.returncode == 2 and "read-only" in res.stderr and "Traceback" not in res.stderr


def test_a_damaged_store_is_a_message_not_a_traceback(tmp_path):
    db = tmp_path / "damaged.sqlite"
    with Store(db) as st:
        run = st.start_run("r", {}, "test")
        for i in range(400):  # several pages of rows
            st.add(run, {"kind": "speed", "case_key": f"k{i}", "mechanism": "m" * 200, "status": "ok"})
    con = sqlite3.connect(db)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    data = bytearray(db.read_bytes())
    page = 4096
    for p in range(4, len(data) // page):  # scribble over the later pages, keep the header page
        data[p * page : p * page + 64] = b"\xff" * 64
    db.write_bytes(bytes(data))
    for argv in (["report", "--db", str(db), "--out", str(tmp_path / "r.html")], ["export", "--db", str(db)]):
        res = attnkit(*argv)
        assert res.returncode == 2, res.stderr
        assert "damaged" in res.stderr and "Traceback" not in res.stderr, res.stderr


def test_a_run_killed_outright_is_marked_interrupted_by_the_next_sweep(tmp_path):
    db = tmp_path / "k.sqlite"
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    with Store(db) as st:
        st.start_run("dead", {}, "killed", pid=int(gone.stdout))  # a pid that no longer exists
        st.start_run("alive", {}, "still going", pid=os.getpid())
    res = attnkit(*SMALL_SWEEP, "--lengths", "16", "--db", str(db), "--runs", "1")
    assert res.returncode == 0, res.stderr
    with Store(db, readonly=True) as st:
        status = {r["run_id"]: r["status"] for r in st.runs()}
    assert status["dead"] == "interrupted" and status["alive"] == "running"
