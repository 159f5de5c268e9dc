"""The results store: one SQLite file, WAL mode, append-only rows with the environment on each.

- ``PRAGMA application_id`` marks the file as attnkit's and ``PRAGMA user_version`` holds the schema
  version: opening any other SQLite file, a non-SQLite file, or a store written by a newer attnkit is
  an error before anything is written.
- Every result is one row inserted in its own transaction, so a killed run loses at most the case in
  flight, and two runs can write at once (WAL + a busy timeout serialise their short writes).
- A row's ``case_key`` identifies what was measured (and where); ``done`` lets a sweep skip it.
- A store of an older schema is upgraded in place (new columns are added, old rows keep NULL there);
  opened read-only it is read as it is.
- A run records its process id: a run left "running" by a process that no longer exists (killed with
  ``kill -9``, a power cut) is marked interrupted by the next sweep.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sqlite3
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import AttnkitError

SCHEMA_VERSION = 2  # 2: paired timing (iqr, baseline, speed-up), machine load and doubts; run pids
APPLICATION_ID = 0x41544B31  # "ATK1"
DEFAULT_DB = "attnkit-results.sqlite"
BUSY_TIMEOUT_MS = 60_000
FINAL = "('ok', 'skipped', 'not_applicable', 'diverged')"  # statuses a re-run does not measure again


class StoreError(AttnkitError):
    """The store file cannot be used (not attnkit's, newer schema, unreadable)."""


# Columns of a result row, in order. Environment columns repeat the run's so each row stands alone.
RESULT_COLUMNS: dict[str, str] = {
    "schema_version": "INTEGER NOT NULL",
    "run_id": "TEXT NOT NULL",
    "created_at": "REAL NOT NULL",
    "kind": "TEXT NOT NULL",  # speed | decode | fidelity | peer
    "case_key": "TEXT NOT NULL",
    "mechanism": "TEXT NOT NULL",
    "path": "TEXT",
    "pattern": "TEXT",
    "mode": "TEXT",  # fwd | fwdbwd | decode | fidelity
    "tokens": "INTEGER",  # T: keys (and queries for self patterns)
    "tq": "INTEGER",
    "tk": "INTEGER",
    "batch": "INTEGER",
    "heads": "INTEGER",
    "kv_heads": "INTEGER",
    "head_dim": "INTEGER",
    "dtype": "TEXT",
    "options": "TEXT",  # JSON of the mechanism's options
    "status": "TEXT NOT NULL",  # ok | skipped | error | timeout | oom | not_applicable | diverged
    "reason": "TEXT",
    "median_ms": "REAL",
    "min_ms": "REAL",
    "iqr_ms": "REAL",  # interquartile range of the per-call latency
    "runs": "INTEGER",  # calls timed
    "rounds": "INTEGER",  # timed blocks (samples)
    "baseline_ms": "REAL",  # SDPA softmax (decode: softmax with a KV cache), timed interleaved in the same worker
    "speedup": "REAL",  # paired: median over rounds of baseline time / this case's time (> 1: faster)
    "speedup_spread": "REAL",  # relative IQR of those per-round ratios
    "peak_bytes": "INTEGER",
    "flops": "REAL",
    "gflops": "REAL",
    "peak_fraction": "REAL",
    "state_bytes": "INTEGER",
    "error": "REAL",  # fidelity: relative error against exact softmax
    "score": "REAL",  # quality: the task's metric on its test data (extra names it and its direction)
    "extra": "TEXT",  # JSON: anything kind-specific (temperature, input kind, peer package...)
    "calib_gflops": "REAL",  # a quick matmul just before the case: the machine's speed right then
    "others_cores": "REAL",  # CPU other processes used during the case, in cores
    "steal": "REAL",  # share of CPU time the hypervisor stole during the case
    "doubtful": "TEXT",  # why this figure is not to be trusted (busy machine, wide spread), or NULL
    "git_rev": "TEXT",
    "torch_version": "TEXT",
    "device": "TEXT",
    "threads": "INTEGER",
    "seed": "INTEGER",
}
RUN_COLUMNS: dict[str, str] = {
    "run_id": "TEXT PRIMARY KEY",
    "started_at": "REAL NOT NULL",
    "finished_at": "REAL",
    "status": "TEXT NOT NULL",  # running | finished | interrupted
    "command": "TEXT",
    "git_rev": "TEXT",
    "torch_version": "TEXT",
    "python": "TEXT",
    "device": "TEXT",
    "threads": "INTEGER",
    "seed": "INTEGER",
    "hostname": "TEXT",
    "matmul_gflops": "REAL",  # this machine's measured matmul peak for the run's dtype
    "matmul_dtype": "TEXT",
    "pid": "INTEGER",  # the sweep's process, on ``hostname``: gone while "running" means it was killed
}


@dataclass(frozen=True)
class Run:
    run_id: str
    env: dict[str, Any]  # git_rev, torch_version, device, threads, seed (copied onto every row)


def _uri(path: Path, mode: str | None = None) -> str:
    """An SQLite URI for ``path`` with every special character quoted (``#``, ``?``, ``%``, spaces):
    pasted raw, ``data.db#x`` would open ``data.db``."""
    uri = "file:" + urllib.parse.quote(str(path.absolute()), safe="/")
    return uri + (f"?mode={mode}" if mode else "")


def _check_file(path: Path) -> None:
    """Refuse anything that is not an attnkit store of a schema this version can read."""
    if not path.exists():
        return
    if path.is_dir():
        raise StoreError(f"{path} is a directory; --db needs a file path")
    with open(path, "rb") as f:
        head = f.read(16)
    if head and head != b"SQLite format 3\x00":
        raise StoreError(f"{path} is not an attnkit results database (not an SQLite file); choose another --db")
    if not head:
        return
    try:
        con = sqlite3.connect(_uri(path, "ro"), uri=True)
    except sqlite3.Error as err:
        raise StoreError(f"cannot open {path} ({err})") from None
    try:
        app = con.execute("PRAGMA application_id").fetchone()[0]
        version = con.execute("PRAGMA user_version").fetchone()[0]
        tables = con.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0]
    except sqlite3.DatabaseError as err:
        raise StoreError(f"{path} cannot be read as SQLite ({err}); choose another --db") from None
    finally:
        con.close()
    if app != APPLICATION_ID and tables == 0:
        return  # an SQLite file with nothing in it: a store another process is creating right now (its WAL
        # header is written before its tables), or an empty database: either way ours to initialise
    if app != APPLICATION_ID:
        raise StoreError(f"{path} is an SQLite file but not an attnkit results database; choose another --db")
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"{path} has schema version {version}, newer than this attnkit's {SCHEMA_VERSION}; upgrade attnkit"
        )


class Store:
    """Open (creating if needed) an attnkit results database."""

    def __init__(self, path: str | Path = DEFAULT_DB, *, readonly: bool = False):
        self.path = Path(path)
        _check_file(self.path)
        if readonly and not self.path.exists():
            raise StoreError(f"no results database at {self.path}; run 'attnkit bench speed' first or pass --db")
        if readonly and self.path.stat().st_size == 0:
            raise StoreError(f"{self.path} is empty, not a results database; run 'attnkit bench speed' into it first")
        uri = _uri(self.path, "ro" if readonly else None)
        try:
            # isolation_level=None: autocommit; every write below is its own short transaction
            self.con = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        except sqlite3.OperationalError as err:
            raise StoreError(f"cannot open results database {self.path}: {err}") from None
        self.con.row_factory = sqlite3.Row
        self.con.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        if not readonly:
            self._init_schema()

    def _init_schema(self) -> None:
        with self._sqlite_errors("prepare"):
            self.con.execute("PRAGMA journal_mode = WAL")  # persistent in the file; a no-op when already set
            with self._write():
                if self.con.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID:
                    self._upgrade()
                    return
                self._create()

    def _create(self) -> None:
        runs = ", ".join(f"{c} {t}" for c, t in RUN_COLUMNS.items())
        results = ", ".join(f"{c} {t}" for c, t in RESULT_COLUMNS.items())
        self.con.execute(f"CREATE TABLE IF NOT EXISTS runs ({runs})")
        self.con.execute(f"CREATE TABLE IF NOT EXISTS results (id INTEGER PRIMARY KEY AUTOINCREMENT, {results})")
        self.con.execute("CREATE INDEX IF NOT EXISTS results_case ON results (case_key, status)")
        self.con.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        self.con.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _upgrade(self) -> None:
        """Add the columns a store of an older schema lacks (its old rows read NULL there)."""
        for table, columns in (("runs", RUN_COLUMNS), ("results", RESULT_COLUMNS)):
            have = {r[1] for r in self.con.execute(f"PRAGMA table_info({table})")}
            for name, kind in columns.items():
                if name not in have:
                    self.con.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind.replace(' NOT NULL', '')}")
        self.con.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @contextlib.contextmanager
    def _sqlite_errors(self, doing: str) -> Iterator[None]:
        """SQLite's failures (a read-only file, damaged pages, a full disk) as a StoreError that says what to do."""
        try:
            yield
        except sqlite3.DatabaseError as err:
            text = str(err)
            if "readonly" in text or "read-only" in text:
                hint = "the file (or its folder) is read-only: make it writable or choose another --db"
            elif "malformed" in text or "not a database" in text or "corrupt" in text:
                hint = "the file is damaged: restore it from a copy, or start a new store with another --db"
            elif "locked" in text or "busy" in text:
                hint = "another process holds it locked for too long; try again"
            else:
                hint = "choose another --db"
            raise StoreError(f"cannot {doing} results database {self.path}: {text}; {hint}") from None

    @contextlib.contextmanager
    def _write(self) -> Iterator[None]:
        # BEGIN IMMEDIATE takes the write lock up front, so a concurrent writer waits (busy_timeout)
        # instead of failing half-way
        self.con.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.con.execute("ROLLBACK")
            raise
        self.con.execute("COMMIT")

    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- runs -------------------------------------------------------------------------------------

    def start_run(self, run_id: str, env: dict[str, Any], command: str, **extra: Any) -> Run:
        row = {"run_id": run_id, "started_at": time.time(), "status": "running", "command": command, **env,
               "hostname": socket.gethostname(), "pid": os.getpid(), **extra}  # fmt: skip
        row = {k: v for k, v in row.items() if k in RUN_COLUMNS}
        with self._sqlite_errors("write to"), self._write():
            self.con.execute(
                f"INSERT INTO runs ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})", list(row.values())
            )
        keep = ("git_rev", "torch_version", "device", "threads", "seed")
        return Run(run_id, {k: env.get(k) for k in keep})

    def finish_run(self, run: Run, status: str = "finished") -> None:
        with self._sqlite_errors("write to"), self._write():
            self.con.execute(
                "UPDATE runs SET status = ?, finished_at = ? WHERE run_id = ?", (status, time.time(), run.run_id)
            )

    def runs(self) -> list[dict[str, Any]]:
        with self._sqlite_errors("read"):
            return [
                dict.fromkeys(RUN_COLUMNS) | dict(r) for r in self.con.execute("SELECT * FROM runs ORDER BY started_at")
            ]

    def mark_abandoned_runs(self) -> list[str]:
        """Mark interrupted every run still "running" whose process on this host is gone; their ids."""
        host = socket.gethostname()
        with self._sqlite_errors("read"):
            running = self.con.execute("SELECT run_id, hostname, pid FROM runs WHERE status = 'running'").fetchall()
        gone = [r["run_id"] for r in running if r["hostname"] == host and r["pid"] and not _alive(r["pid"])]
        for run_id in gone:
            self.finish_run(Run(run_id, {}), "interrupted")
        return gone

    # ---- results ----------------------------------------------------------------------------------

    def add(self, run: Run, row: dict[str, Any]) -> None:
        """Append one result (its own transaction: a crash after this keeps it)."""
        full = {"schema_version": SCHEMA_VERSION, "run_id": run.run_id, "created_at": time.time(), **run.env, **row}
        for key in ("options", "extra"):
            if isinstance(full.get(key), dict):
                full[key] = json.dumps(full[key], sort_keys=True)
        unknown = set(full) - set(RESULT_COLUMNS)
        if unknown:
            raise StoreError(f"unknown result fields {sorted(unknown)}")
        with self._sqlite_errors("write to"), self._write():
            self.con.execute(
                f"INSERT INTO results ({', '.join(full)}) VALUES ({', '.join('?' * len(full))})", list(full.values())
            )

    def done(self, case_key: str) -> bool:
        """Whether a case already has a final result (measured, skipped for a recorded reason, not applicable,
        or diverged: a seeded training run diverges again)."""
        q = f"SELECT 1 FROM results WHERE case_key = ? AND status IN {FINAL} LIMIT 1"
        with self._sqlite_errors("read"):
            return self.con.execute(q, (case_key,)).fetchone() is not None

    def results(self, kind: str | None = None, *, latest: bool = True) -> list[dict[str, Any]]:
        """Result rows as dicts (JSON columns decoded); ``latest`` keeps the newest row per case."""
        where = "WHERE kind = ?" if kind else ""
        args = (kind,) if kind else ()
        if latest:
            sql = (
                f"SELECT * FROM results WHERE id IN (SELECT MAX(id) FROM results {where} GROUP BY case_key) ORDER BY id"
            )
        else:
            sql = f"SELECT * FROM results {where} ORDER BY id"
        rows = []
        with self._sqlite_errors("read"):
            for r in self.con.execute(sql, args):
                d = dict.fromkeys(RESULT_COLUMNS) | dict(r)  # an older store's missing columns read None
                for key in ("options", "extra"):
                    d[key] = json.loads(d[key]) if d.get(key) else {}
                rows.append(d)
        return rows


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True
