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


@pytest.fixture
def tiny_forecast(monkeypatch):
    """The forecast task's quick preset shrunk to seconds: 24 hours -> 4, 6 steps."""
    from attnkit.bench.tasks.forecast import Forecast, ForecastPreset

    tiny = ForecastPreset(vocab=0, seq_len=24, n_train=48, n_test=8, steps=6, batch_size=16, horizon=4)
    monkeypatch.setitem(Forecast.presets, "quick", tiny)
    return tiny


def test_forecast_trains_on_the_guess_and_scores_the_forecast_decoded_with_state(tiny_forecast, monkeypatch):
    case = QualityCase("forecast", "softmax", "quick")
    assert case.pattern == "noncausal_cross" and case.tokens == 24
    calls = []
    real = quality.forecast
    monkeypatch.setattr(quality, "forecast", lambda *a: calls.append(a[2].shape[1]) or real(*a))
    result = case.measure(threads=1, budget=Budget())
    assert result["status"] == "ok" and 0 < result["score"] < 10
    extra = result["extra"]
    assert extra["metric"] == "mse" and extra["higher_is_better"] is False and extra["steps"] == 6
    test = case._task.make("test", "quick")
    assert extra["baseline"] == pytest.approx(case._task.baselines(test))
    assert 0 < extra["baseline"]["seasonal_naive_mse"] < 0.1, "the day before is a good guess for this series"
    assert calls and set(calls) == {4}, "every evaluation decodes the horizon step by step"


def test_forecast_decoded_with_state_equals_one_call_on_the_guess():
    """The step-by-step forecast equals guess + one call on the guess (softmax's noncausal and causal cross
    attention agree per query), and the guess is the seasonal-naive forecast."""
    from attnkit.nn import EncoderDecoder

    torch.manual_seed(0)
    model = EncoderDecoder(in_dim=1, out_dim=1, dim=16, depth=1, heads=2, cross_pattern="noncausal_cross").eval()
    from attnkit.bench.tasks import get_task

    history = torch.randn(3, 30, 1)
    guess = get_task("forecast").guess(history, 5)
    torch.testing.assert_close(guess, history[:, 6:11])  # 24 hours before each step
    pred = quality.forecast(model, history, guess)
    assert pred.shape == (3, 5, 1)
    torch.testing.assert_close(guess + model(history, guess), pred, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(pred, guess), "the model's correction is added"


def test_a_mechanism_without_the_forecasts_cross_patterns_is_not_applicable():
    import attnkit

    by_patterns = {m.name: {p.value for p in m.patterns} for m in attnkit.mechanisms()}
    no_cross = next(
        n for n, ps in by_patterns.items() if {"causal_self", "noncausal_self"} <= ps and "noncausal_cross" not in ps
    )
    result = QualityCase("forecast", no_cross, "quick").measure(threads=1, budget=Budget())
    assert result["status"] == "not_applicable" and "noncausal_cross" in result["reason"]
    only_noncausal = next(n for n, ps in by_patterns.items() if "noncausal_cross" in ps and "causal_self" not in ps)
    result = QualityCase("forecast", only_noncausal, "quick").measure(threads=1, budget=Budget())
    assert result["status"] == "not_applicable" and "causal_self" in result["reason"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_the_gpu_preset_needs_cuda(tmp_path, capsys):
    assert main(["bench", "quality", "--db", str(tmp_path / "q.sqlite"), "--preset", "gpu", "--tasks", "mqar"]) != 0
    assert "no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "q.sqlite").exists()


def test_positions_are_a_case_setting_with_their_own_key():
    learned = QualityCase("induction", "softmax", "quick")
    rope = QualityCase("induction", "softmax", "quick", positions="rope")
    assert "positions" not in learned.key("cpu", 1), "the default leaves older stores' keys as they were"
    assert rope.key("cpu", 1) != learned.key("cpu", 1) and rope.series != learned.series
    assert "rope positions" in rope.label() and rope.row()["extra"]["positions"] == "rope"
    model = quality.build_model(rope, rope._task, 16, 64)
    assert model.inputs.pos is None, "no learned position table with rope"
    with pytest.raises(InvalidOption, match="positions"):
        QualityCase("induction", "softmax", "quick", positions="sinusoidal")
