"""Figures that stay true on a busy machine: load watching, doubt flags, the skip predictor, the requests."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from attnkit.bench import machine
from attnkit.bench.case import growth_from_complexity
from attnkit.bench.cases import speed_cases, split_names
from attnkit.bench.runner import Budget, Summary, _Point, predict_skip, run_worker
from attnkit.bench.speed import Case
from attnkit.cli import main

HOG = "import time\nend = time.time() + {s}\nwhile time.time() < end:\n    pass\n"


def test_a_busy_machine_is_seen_and_the_row_flagged():
    """Two CPU-bound processes beside a case on a machine with no spare core: the row says so."""
    cores = __import__("os").cpu_count() or 1
    hogs = [subprocess.Popen([sys.executable, "-c", HOG.format(s=30)]) for _ in range(cores)]
    try:
        time.sleep(0.5)
        case = Case("speed", "linear", "chunk", "causal_self", "fwd", 256, heads=2, kv_heads=2, head_dim=16, runs=3)
        result = run_worker(case, threads=cores, timeout_s=120, budget=Budget(time_s=20, timing_s=0.5))
        # --wait-quiet waits while the machine stays busy, and says so when it gives up
        started = time.monotonic()
        still = machine.wait_quiet(cores, max_wait_s=1.0, poll_s=0.5)
        waited = time.monotonic() - started
    finally:
        for h in hogs:
            h.kill()
    assert result["status"] == "ok", result
    load = machine.Load(result["others_cores"], result["steal"])
    assert result["others_cores"] > 0.5 * cores, result
    assert machine.busy_reason(load, cores).startswith("busy:")
    assert still is not None and still.startswith("busy:") and waited >= 1.0


def test_doubts_name_each_reason():
    quiet = machine.Load(0.05, 0.0)
    assert machine.doubts(load=quiet, threads=2, calib_gflops=200, best_calib=210, spread=0.03,
                          speedup_spread=0.02) == []  # fmt: skip
    busy = machine.Load(1.6, 0.0)
    reasons = machine.doubts(load=busy, threads=machine.spare_cores(0) or 1, calib_gflops=100, best_calib=220,
                             spread=0.4, speedup_spread=0.3)  # fmt: skip
    kinds = [r.split(":")[0] for r in reasons]
    assert kinds == ["busy", "slow", "spread", "spread"], reasons
    assert machine.doubts(load=machine.Load(None, 0.3), threads=1, calib_gflops=None, best_calib=None,
                          spread=None, speedup_spread=None)[0].startswith("steal:")  # fmt: skip
    # a short window cannot be judged from 10 ms ticks: no load figure rather than a wrong one
    a = machine.sample()
    assert machine.Load.between(a, machine.sample()).others_cores is None


def test_summary_says_how_many_figures_are_doubtful():
    s = Summary()
    s.count("a", "ok")
    s.count("b", "ok", doubts=["busy: 1.9 cores", "spread: 40%"])
    s.count("c", "ok", doubts=["busy: 1.2 cores"])
    assert s.doubt_text() == "2 of 3 figures are doubtful: the machine was busy (2), the timings spread widely (1)"
    assert Summary().doubt_text() is None


@pytest.mark.parametrize(
    ("text", "path", "power"),
    [
        ("O(T·D²)", "chunk", 1.0),
        ("O(Tq·Tk·D)", "sdpa", 2.0),
        ("O(T²/L·D)", "chunk", 2.0),
        ("O(T·log T·m·Dv) (fft), O(T·max_len·(m+Dv)) (banded)", "banded", 1.0),
        ("O(T·D²) (causal_cross: O(Tq·Tk·D))", "chunk", 1.0),
        ("O(T·√T·D)", "blocked", 1.5),
        ("O(n)", "x", 2.0),
    ],
)
def test_declared_growth_is_read_from_the_complexity(text, path, power):
    assert growth_from_complexity(text, path) == power


def _case(path="chunk", mech="linear", t=4096):
    return Case("speed", mech, path, "causal_self", "fwd", t)


def test_a_linear_path_is_never_predicted_as_t_squared():
    """The busy-machine failure: one slow point at T=256 skipped linear/chunk at 4K 'grown as T^2'."""
    history = [_Point(256, "ok", ms=180.0)]
    reason = predict_skip(_case(), history, Budget(time_s=15), 2**34)
    assert reason is not None and "T^1.00" in reason and "declared T^1" in reason and "T=256" in reason
    # the same point for a quadratic path grows as T^2
    quad = predict_skip(_case("sdpa", "softmax"), history, Budget(time_s=15), 2**34)
    assert "T^2.00" in quad


def test_doubtful_points_are_never_predicted_from():
    history = [_Point(256, "ok", ms=1.0), _Point(1024, "ok", ms=900.0, doubtful=True)]
    assert predict_skip(_case(), history, Budget(time_s=15), 2**34) is None
    history[1].doubtful = False
    assert "from the fastest run at T=1024" in predict_skip(_case(), history, Budget(time_s=15), 2**34)


def test_measured_growth_is_held_to_the_declared_complexity():
    # noisy points suggesting T^3 for a path declared linear: held to 1.2
    history = [_Point(256, "ok", ms=1.0), _Point(1024, "ok", ms=64.0)]
    reason = predict_skip(_case(t=8192), history, Budget(time_s=1), 2**34)
    assert "grown as T^1.20" in reason and "measured T^3.00" in reason


def test_names_and_lengths_take_lists():
    assert split_names("lin*,sigmoid") == ["lin*", "sigmoid"]
    assert split_names(["lin* sigmoid", "softmax"]) == ["lin*", "sigmoid", "softmax"]
    cases = speed_cases(names=["linear,sigmoid"], patterns=("causal_self",), lengths=(64,))
    assert {c.mechanism for c in cases} == {"linear", "sigmoid", "softmax"}


def test_cli_lists_of_names_and_lengths(tmp_path, capsys):
    db = tmp_path / "l.sqlite"
    code = main(["bench", "speed", "--db", str(db), "--no-progress", "--mechanisms", "linear", "sigmoid",
                 "--patterns", "causal_self", "--modes", "fwd", "--lengths", "32,64", "--runs", "1"])  # fmt: skip
    assert code == 0
    from attnkit.bench.store import Store

    with Store(db, readonly=True) as st:
        rows = st.results()
    assert {r["mechanism"] for r in rows} == {"linear", "sigmoid", "softmax"}
    assert {r["tokens"] for r in rows} == {32, 64} and all(r["status"] == "ok" for r in rows)


def test_a_selection_of_only_baselines_says_so(tmp_path, capsys):
    """softmax_free has no causal pattern: asked for causal_self, only the baselines would run."""
    db = tmp_path / "b.sqlite"
    code = main(["bench", "speed", "--db", str(db), "--no-progress", "--mechanisms", "softmax_free",
                 "--patterns", "causal_self", "--modes", "fwd", "--lengths", "32", "--runs", "1"])  # fmt: skip
    assert code == 0
    assert "softmax_free has no case in this selection" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["report", "export"])
def test_an_unwritable_output_is_a_message(tmp_path, capsys, command):
    from attnkit.bench.store import Store

    db = tmp_path / "s.sqlite"
    Store(db).close()
    target = tmp_path / "no" / "such" / "dir"
    target.parent.parent.mkdir()
    target.parent.write_text("a file where a folder should be")
    code = main([command, "--db", str(db), "--out", str(target / "out.html")])
    assert code == 2 and "choose another --out" in capsys.readouterr().err
