"""``attnkit bench cp`` end to end (W = 1, 2 processes, ulysses): rows in the store with time, memory per rank,
bytes measured equal to the formula, the error against one process; a refused mechanism recorded without a launch;
the report's section only when cp rows exist."""

from __future__ import annotations

import pytest

from attnkit.bench.cp import CPCase, _measure
from attnkit.bench.store import Store
from attnkit.cli import main
from attnkit.report import build_report

ARGS = ["--mechanisms", "softmax,retention", "--strategy", "ulysses", "--worlds", "1", "2", "--lengths", "32",
        "--heads", "4", "--kv-heads", "2", "--head-dim", "8", "--runs", "2", "--dtype", "float64"]  # fmt: skip


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    path = tmp_path_factory.mktemp("cp") / "cp.sqlite"
    assert main(["bench", "cp", "--db", str(path), *ARGS]) == 0
    return path


def _rows(db) -> list[dict]:
    with Store(db, readonly=True) as store:
        return store.results("cp")


def test_each_world_has_a_measured_row_checked_against_one_process(db):
    ok = {r["extra"]["world"]: r for r in _rows(db) if r["mechanism"] == "softmax"}
    assert set(ok) == {1, 2}
    for w, r in ok.items():
        assert r["status"] == "ok", r["reason"]
        assert r["extra"]["ran"] == "ulysses"
        assert r["median_ms"] > 0 and r["runs"] == 2
        assert len(r["extra"]["peak_bytes_per_rank"]) == w
        assert r["peak_bytes"] == max(r["extra"]["peak_bytes_per_rank"])
        assert r["extra"]["checked"] and r["error"] < 1e-12


def test_bytes_sent_are_measured_and_equal_ulysses_formula(db):
    r = next(r for r in _rows(db) if r["mechanism"] == "softmax" and r["extra"]["world"] == 2)
    x = r["extra"]
    # per rank: (W-1)/W of q, k, v and the output (fp64): 16 tokens x (4 + 2 + 2 + 4 heads) x 8 x 8 bytes / 2
    assert x["bytes_fwd"] == x["formula_fwd"] == 16 * 12 * 8 * 8 // 2
    assert x["bytes_bwd"] == x["formula_bwd"] == x["bytes_fwd"]
    assert x["bytes_other"] > 0  # the size check's int64 all-gather, kept apart
    one = next(r for r in _rows(db) if r["mechanism"] == "softmax" and r["extra"]["world"] == 1)
    assert one["extra"]["bytes_fwd"] == one["extra"]["bytes_bwd"] == 0


def test_a_refused_mechanism_is_recorded_not_applicable(db):
    rows = [r for r in _rows(db) if r["mechanism"] == "retention"]
    assert len(rows) == 2 and all(r["status"] == "not_applicable" for r in rows)
    assert "heads are not independent: a decay per head index" in rows[0]["reason"]


def test_a_second_run_skips_what_the_store_has(db, capsys):
    assert main(["bench", "cp", "--db", str(db), *ARGS]) == 0
    assert "4 already in the store" in capsys.readouterr().out


def test_larger_t_of_a_failed_series_are_skipped_without_a_launch():
    case = CPCase("softmax", "ulysses", 2, 64, heads=4, kv_heads=2, head_dim=8)
    got = _measure(case, {case.series(): "T=32: rank 1 died (killed by signal 9)"}, 1, 0, 30)
    assert got["status"] == "skipped" and "signal 9" in got["reason"]


def test_the_report_has_a_cp_section_only_with_cp_rows(db, tmp_path):
    html = build_report(db, tmp_path / "r.html").read_text()
    assert 'id="cp"' in html and "largest T held" in html and "Memory per rank: softmax/ulysses" in html
    empty = tmp_path / "empty.sqlite"
    Store(empty).close()
    assert 'id="cp"' not in build_report(empty, tmp_path / "e.html").read_text()
