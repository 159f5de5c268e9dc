"""The quality benchmark: tasks trained through the one pipeline, not-applicable and diverged cases, the report."""

from __future__ import annotations

import pytest
import torch

from attnkit.bench import quality
from attnkit.bench.case import Budget
from attnkit.bench.quality import QualityCase, quality_cases
from attnkit.bench.store import Store
from attnkit.cli import main
from attnkit.errors import InvalidOption, UnknownMechanism, UnknownTask
from attnkit.report import build_report


def test_requests_are_checked_before_anything_runs():
    with pytest.raises(UnknownTask, match="mqar"):
        quality_cases(tasks=["mqarr"], names="softmax", preset="quick", seeds=(0,))
    with pytest.raises(UnknownMechanism):
        quality_cases(tasks=["mqar"], names="softmaxx", preset="quick", seeds=(0,))
    with pytest.raises(InvalidOption, match="quick"):
        quality_cases(tasks=["mqar"], names="softmax", preset="huge", seeds=(0,))
    cases = quality_cases(tasks=["mqar,listops"], names="softmax linear", preset="quick", seeds=(0, 1))
    assert len(cases) == 2 * 2 * 2 and {c.pattern for c in cases} == {"causal_self", "noncausal_self"}


def test_a_mechanism_without_the_tasks_pattern_is_not_applicable():
    case = QualityCase("mqar", "softmax_free", "quick")  # mqar is causal_self; softmax_free is noncausal only
    result = case.measure(threads=1, budget=Budget())
    assert result["status"] == "not_applicable" and "causal_self" in result["reason"]


def test_a_diverging_run_is_recorded_with_its_step(monkeypatch):
    real = quality._loss
    calls = {"n": 0}

    def nan_after_three(task, model, batch):
        loss, logits = real(task, model, batch)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] > 3 else loss), logits

    monkeypatch.setattr(quality, "_loss", nan_after_three)
    result = QualityCase("mqar", "linear", "quick").measure(threads=1, budget=Budget())
    assert result["status"] == "diverged" and "at step 3" in result["reason"]


def test_quality_sweep_into_the_store_and_the_report(tmp_path, capsys):
    db = tmp_path / "q.sqlite"
    argv = ["bench", "quality", "--db", str(db), "--no-progress", "--tasks", "mqar", "--mechanisms", "softmax",
            "softmax_free", "--seeds", "0"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "1 measured" in out and "1 not applicable" in out
    with Store(db, readonly=True) as st:
        rows = {r["mechanism"]: r for r in st.results("quality")}
    ok = rows["softmax"]
    assert ok["status"] == "ok" and 0.0 <= ok["score"] <= 1.0
    extra = ok["extra"]
    assert extra["task"] == "mqar" and extra["version"] >= 1 and extra["params"] > 0 and extra["tokens_per_s"] > 0
    assert len(extra["curve"]) >= 5 and extra["curve"][-1][0] == extra["steps"]
    assert rows["softmax_free"]["status"] == "not_applicable"
    # resume: both are final, nothing runs again
    assert main(argv) == 0 and "2 already in the store" in capsys.readouterr().out
    html = build_report(db, tmp_path / "r.html").read_text()
    section = html[html.index('id="quality"') : html.index('id="decode"')]
    assert "mqar" in section and "softmax_free" in section and "not_applicable" in section
    assert section.count('<figure class="chart">') >= 1


def test_same_seed_same_model_and_data():
    a = QualityCase("induction", "softmax", "quick", seed=3)
    torch.manual_seed(0)
    first = quality.train_and_evaluate(a, a._task)
    second = quality.train_and_evaluate(a, a._task)
    assert first["score"] == second["score"] and first["extra"]["curve"] == second["extra"]["curve"]


def test_lr_sweep_trains_each_rate_and_keeps_the_best(tmp_path, capsys):
    from attnkit.bench.scores import seed_scores

    db = tmp_path / "q.sqlite"
    argv = ["bench", "quality", "--db", str(db), "--no-progress", "--tasks", "mqar", "--mechanisms", "softmax",
            "--lr-sweep", "1e-4,3e-2"]  # fmt: skip
    assert main(argv) == 0
    with Store(db, readonly=True) as st:
        rows = st.results("quality")
    assert sorted(r["extra"]["lr"] for r in rows) == [1e-4, 3e-2] and all(r["extra"]["lr_swept"] for r in rows)
    best = max(r["score"] for r in rows)
    assert seed_scores(rows, "quick")[("causal_self", "mqar", 1)]["softmax"] == {0: best}
    capsys.readouterr()
    for bad in ("0", "1.5", "nan", "fast"):
        with pytest.raises(SystemExit):
            main([*argv[:-1], bad])
        assert "learning rate" in capsys.readouterr().err


def test_best_over_lr_follows_the_metric_direction():
    from attnkit.bench.scores import best_over_lr

    def row(score, lr, higher=True, seed=0):
        extra = {"task": "t", "preset": "quick", "seed": seed, "version": 1, "higher_is_better": higher, "lr": lr}
        return {"kind": "quality", "status": "ok", "score": score, "mechanism": "m", "options": {}, "extra": extra}

    assert best_over_lr([row(0.2, 1e-3), row(0.9, 1e-2)])[0]["extra"]["lr"] == 1e-2
    assert best_over_lr([row(0.2, 1e-3, False), row(0.9, 1e-2, False)])[0]["extra"]["lr"] == 1e-3
    assert len(best_over_lr([row(0.2, 1e-3, seed=0), row(0.9, 1e-2, seed=1)])) == 2
    with pytest.raises(InvalidOption, match="learning rate"):
        QualityCase("mqar", "softmax", lr=2.0**70)
