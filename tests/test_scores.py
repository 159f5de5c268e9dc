"""Quality scores: the compositional index, the seed-matched difference from softmax, the Pareto front and the
reference statistics, on hand-made rows (every expected number is worked out by hand)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from attnkit.bench.scores import (
    SIGMA_FLOOR,
    build_reference,
    compositional_index,
    deltas_vs_softmax,
    load_reference,
    pareto_front,
)
from attnkit.bench.store import Store

ROOT = Path(__file__).resolve().parent.parent


def q(mech, task, score, seed=0, *, version=1, higher=True, preset="quick", pattern="causal_self", options=None):
    """One ok quality row as the store returns it."""
    return {
        "kind": "quality",
        "status": "ok",
        "mechanism": mech,
        "pattern": pattern,
        "score": score,
        "options": options or {},
        "extra": {"task": task, "version": version, "preset": preset, "seed": seed,
                  "metric": "accuracy" if higher else "bits_per_byte", "higher_is_better": higher},
    }  # fmt: skip


REF = {
    "format": 1,
    "presets": {
        "quick": {
            "mqar": {"version": 1, "pattern": "causal_self", "higher_is_better": True, "mean": 0.5, "std": 0.1},
            "byte_lm": {"version": 1, "pattern": "causal_self", "higher_is_better": False, "mean": 2.0, "std": 0.5},
            "listops": {"version": 1, "pattern": "noncausal_self", "higher_is_better": True, "mean": 0.2, "std": 0.05},
        }
    },
}


def test_ci_is_the_mean_z_with_lower_is_better_flipped():
    rows = [
        q("softmax", "mqar", 0.6, 0), q("softmax", "mqar", 0.8, 1),  # mean 0.7: z = +2
        q("softmax", "byte_lm", 1.5, higher=False),  # 0.5 bpb under the mean is better: z = +1
        q("linear", "mqar", 0.4),  # z = -1
        q("linear", "byte_lm", 3.0, higher=False),  # z = -2
        q("linear", "listops", 0.3, pattern="noncausal_self"),  # z = +2, another pattern
    ]  # fmt: skip
    ci = compositional_index(rows, REF, "quick")
    assert ci["causal_self"]["softmax"][0] == pytest.approx(1.5)
    assert ci["causal_self"]["linear"][0] == pytest.approx(-1.5)
    assert ci["causal_self"]["linear"][1] == ("byte_lm", "mqar")
    assert ci["noncausal_self"] == {"linear": (pytest.approx(2.0), ("listops",))}


def test_rows_of_another_task_version_or_preset_are_not_mixed_in():
    rows = [
        q("softmax", "mqar", 0.7),  # v1: z = +2
        q("softmax", "mqar", 0.1, seed=1, version=2),  # v2: the reference is v1, left out
        q("softmax", "byte_lm", 1.5, higher=False),  # z = +1
        q("softmax", "byte_lm", 9.0, seed=1, higher=False, preset="cpu"),  # another preset, left out
        q("linear", "mqar", 0.9, version=2),  # linear only has v2 of mqar: its CI is byte_lm alone
        q("linear", "byte_lm", 2.5, higher=False),  # z = -1
        q("mamba", "selective_copy", 0.9),  # no reference for the task at all
    ]
    ci = compositional_index(rows, REF, "quick")["causal_self"]
    assert ci["softmax"] == (pytest.approx(1.5), ("byte_lm", "mqar"))
    assert ci["linear"] == (pytest.approx(-1.0), ("byte_lm",))
    assert "mamba" not in ci
    assert compositional_index(rows, REF, "gpu") == {} and compositional_index(rows, None, "quick") == {}


def test_delta_vs_softmax_compares_the_seeds_both_ran():
    rows = [q("softmax", "mqar", s, seed) for seed, s in enumerate([0.5, 0.6, 0.9])]
    rows += [q("linear", "mqar", 0.4, 0), q("linear", "mqar", 0.8, 1), q("linear", "mqar", 0.1, 7)]
    rows += [q("performer", "mqar", 0.3, 5)]  # no seed in common with softmax: no difference
    deltas = deltas_vs_softmax(rows, "quick")[("causal_self", "mqar", 1)]
    # seeds 0 and 1: (0.4 + 0.8) / 2 - (0.5 + 0.6) / 2 = 0.05 (all seeds would give 0.433 - 0.667 = -0.233)
    assert deltas == {"linear": (pytest.approx(0.05), 2)}


def test_pareto_front_keeps_every_unbeaten_point_and_ties():
    points = {
        "a": (1.0, 1.0),
        "a_twin": (1.0, 1.0),  # equal to a: neither beats the other, both on the front
        "b": (4.0, 0.5),
        "b_same_x_lower": (4.0, 0.4),  # as fast as b, worse: beaten
        "c": (0.5, 0.5),  # slower and worse than a
        "d": (0.5, 2.0),  # slowest, best: on the front
        "e": (2.0, 0.5),  # as good as b, slower: beaten by b
    }
    assert pareto_front(points) == {"a", "a_twin", "b", "d"}
    assert pareto_front({"only": (1.0, -3.0)}) == {"only"} and pareto_front({}) == set()


def _reference_rows():
    rows = []
    for mech, s in (("softmax", 0.9), ("linear", 0.5), ("sliding_window", 0.7)):
        rows += [q(mech, "mqar", s, 0), q(mech, "mqar", s + 0.1, 1)]  # means 0.95, 0.55, 0.75
        rows.append(q(mech, "mqar", 0.0, version=0))  # an older version of the task: not used
        rows.append(q(mech, "induction", 0.25))  # all alike: σ = 0, floored
    rows += [
        q("softmax", "listops", 0.3, pattern="noncausal_self"),
        q("linear", "listops", 0.2, pattern="noncausal_self"),
    ]
    return rows


def test_build_reference_statistics():
    ref = build_reference(_reference_rows())
    tasks = ref["presets"]["quick"]
    assert set(tasks) == {"mqar", "induction"}  # listops has 2 mechanisms: skipped
    mqar = tasks["mqar"]
    assert mqar["version"] == 1 and mqar["n_mechanisms"] == 3 and mqar["seeds"] == [0, 1]
    assert mqar["mean"] == pytest.approx(0.75) and mqar["std"] == pytest.approx(math.sqrt(0.08 / 3))
    assert mqar["mechanisms"] == ["linear", "sliding_window", "softmax"] and not mqar["std_floored"]
    assert tasks["induction"]["std"] == SIGMA_FLOOR and tasks["induction"]["std_floored"]
    # on its own scale the reference mechanisms' z average 0 with unit spread (population std)
    ci = compositional_index(_reference_rows(), ref, "quick")["causal_self"]
    zs = [ci[m][0] * 2 for m in ci]  # CI = (z_mqar + z_induction) / 2, and z_induction = 0
    assert sum(zs) == pytest.approx(0.0) and sum(z * z for z in zs) / 3 == pytest.approx(1.0)


def _script():
    spec = importlib.util.spec_from_file_location("build_reference_scores", ROOT / "scripts/build_reference_scores.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reference_script_round_trip(tmp_path, capsys):
    db = tmp_path / "ref.sqlite"
    with Store(db) as st:
        run = st.start_run("ref-run", {"git_rev": "abc", "torch_version": "2.13", "device": "cpu"}, "bench quality")
        for i, r in enumerate(_reference_rows()):
            st.add(run, {**r, "case_key": f"c{i}"})
    out = tmp_path / "ref.json"
    out.write_text(json.dumps({"format": 1, "presets": {"gpu": {"kept": {}}}, "sources": {"gpu": {}}}))
    assert _script().main(["--db", str(db), "--preset", "quick", "--out", str(out)]) == 0
    assert "mqar" in capsys.readouterr().out
    loaded = load_reference(out)
    assert loaded["presets"]["quick"] == build_reference(_reference_rows())["presets"]["quick"]
    assert loaded["presets"]["gpu"] == {"kept": {}}  # --preset replaces only its preset
    source = loaded["sources"]["quick"]
    assert (
        source["store"] == "ref.sqlite" and source["git_revs"] == ["abc"] and source["runs"][0]["run_id"] == "ref-run"
    )
    assert loaded["header"]["attnkit_version"] and loaded["header"]["sigma_floor"] == SIGMA_FLOOR
    assert _script().main(["--db", str(db), "--preset", "gpu", "--out", str(tmp_path / "x.json")]) == 1


def test_the_shipped_reference_loads():
    ref = load_reference()
    assert ref is not None and ref["presets"]["quick"], "src/attnkit/bench/reference_scores.json"
    for stats in ref["presets"]["quick"].values():
        assert stats["n_mechanisms"] >= 3 and "softmax" in stats["mechanisms"]
        assert stats["std"] == max(stats["std_raw"], stats["std_floor"]) > 0
    assert load_reference(ROOT / "no-such-file.json") is None


def test_the_cli_summary_gives_the_ci_per_pattern(tmp_path, monkeypatch):
    from attnkit.cli import quality as cli_quality

    monkeypatch.setattr(cli_quality, "load_reference", lambda: REF)
    db = tmp_path / "s.sqlite"
    rows = [q("softmax", "mqar", 0.7), q("linear", "mqar", 0.4), q("softmax", "listops", 0.3, pattern="noncausal_self"),
            q("linear", "mqar", 0.9, preset="cpu")]  # fmt: skip
    with Store(db) as st:
        run = st.start_run("r", {"device": "cpu"}, "test")
        for i, r in enumerate(rows):
            st.add(run, {**r, "case_key": f"c{i}"})
    text = cli_quality.quality_summary(str(db))
    lines = [" ".join(line.split()) for line in text.splitlines()]
    assert "causal_self softmax +2.00 mqar" in lines and "causal_self linear -1.00 mqar" in lines
    assert "noncausal_self softmax +2.00 listops" in lines
    assert lines.index("causal_self softmax +2.00 mqar") < lines.index("causal_self linear -1.00 mqar")
    assert "no compositional index for the cpu preset: no reference statistics ship for it" in text


def test_sigma_floor_is_in_the_metrics_unit_or_relative_to_its_mean():
    from attnkit.bench.scores import sigma_floor

    assert sigma_floor("accuracy", 0.5) == SIGMA_FLOOR and sigma_floor("bits_per_byte", 5.0) == SIGMA_FLOOR
    assert sigma_floor("mse", 0.002) == pytest.approx(SIGMA_FLOOR * 0.002), "an absolute 0.01 would flatten every z"
    assert sigma_floor("mse", 0.0) > 0
