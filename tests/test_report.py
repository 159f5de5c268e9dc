"""The HTML report: self-contained, every section present, and every chart drawn in a real browser."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pytest

from attnkit.bench.store import Store
from attnkit.report import build_report
from browser import CHROMIUM_FLAGS, chromium_or_skip

LENGTHS = [256, 512, 1024, 2048]


def _speed(mech, path, pattern, t, ms, peak, **extra):
    return {
        "kind": "speed",
        "case_key": f"{mech}/{path}/{pattern}/{t}/{extra}",
        "mechanism": mech,
        "path": path,
        "pattern": pattern,
        "mode": "fwd",
        "tokens": t,
        "dtype": "float32",
        "status": "ok",
        "median_ms": ms,
        "min_ms": ms and ms * 0.9,
        "iqr_ms": ms and ms * 0.05,
        "runs": 5,
        "peak_bytes": peak,
        "gflops": 50.0,
        **extra,
    }


def _quality(mech, task, score, *, pattern="causal_self", seed=0, preset="quick", variants=None, **extra):
    """A finished quality row, as ``attnkit bench quality`` stores it."""
    variants = variants or {"{}": score}
    return {
        "kind": "quality",
        "case_key": f"q/{mech}/{task}/{preset}/{seed}",
        "mechanism": mech,
        "path": "auto",
        "pattern": pattern,
        "mode": "train",
        "tokens": 32,
        "dtype": "float32",
        "status": "ok",
        "score": score,
        "extra": {"task": task, "version": 1, "preset": preset, "seed": seed, "metric": "accuracy",
                  "higher_is_better": True, "variants": variants, "curve": [(10, 2.0, score / 2), (20, 1.5, score)],
                  "params": 1000, "tokens_per_s": 5000.0, "lr": 1e-3, **extra},
    }  # fmt: skip


def add_quality_rows(st, run):
    """Quality rows of every kind the section draws: a scatter per pattern with speed rows, the ranking alone
    for a pattern without (causal_cross, preset cpu: scored against the store's own mechanisms), heatmaps."""
    for i, mech in enumerate(("softmax", "linear", "sliding_window", "performer")):
        for seed in (0, 1):
            acc = 0.9 - 0.2 * i + 0.05 * seed
            st.add(run, _quality(mech, "mqar", acc, seed=seed))
            st.add(run, _quality(mech, "listops", acc / 3, pattern="noncausal_self", seed=seed))
            st.add(run, _quality(mech, "forecast", acc, pattern="causal_cross", seed=seed, preset="cpu"))
            lengths = {json.dumps({"length": n}): max(0.0, acc - 0.1 * k) for k, n in enumerate((16, 32, 64, 128))}
            st.add(run, _quality(mech, "induction", sum(lengths.values()) / 4, seed=seed, variants=lengths))
            grid = {json.dumps({"depth": d, "length": n}, sort_keys=True): acc * (1 - d / 2) for n in (32, 64)
                    for d in (0.1, 0.5, 0.9)}  # fmt: skip
            st.add(run, _quality(mech, "passkey", sum(grid.values()) / len(grid), seed=seed, variants=grid))


@pytest.fixture(autouse=True)
def fixed_reference(monkeypatch):
    """The report scores against REF, not the shipped reference (which is regenerated from real runs)."""
    from attnkit.report import quality as report_quality

    monkeypatch.setattr(report_quality, "load_reference", lambda: REF)


@pytest.fixture
def store_path(tmp_path):
    """A store with rows of every kind, written through the public Store API (no measuring)."""
    db = tmp_path / "synthetic.sqlite"
    with Store(db) as st:
        run = st.start_run(
            "r1",
            {"git_rev": "abc123", "torch_version": "2.13", "device": "test cpu", "threads": 2, "seed": 0},
            "pytest",
            matmul_gflops=140.0,
            matmul_dtype="float32",
        )
        for pattern in ("causal_self", "noncausal_self"):
            for t in LENGTHS:
                st.add(run, _speed("softmax", "sdpa", pattern, t, t * t / 2e4, 40 * t))
                st.add(run, _speed("softmax", "reference", pattern, t, t * t / 5e3, 100 * t * t))
                st.add(run, _speed("linear", "chunk", pattern, t, t / 40, 900 * t))
                st.add(
                    run,
                    _speed(
                        "sliding_window",
                        "peer",
                        pattern,
                        t,
                        t / 20,
                        700 * t,
                        kind="peer",
                        extra={"peer": "local-attention"},
                    ),
                )
                st.add(run, _speed("sliding_window", "blocked", pattern, t, t / 30, 600 * t))
        for t in (1024, 4096):
            st.add(
                run,
                {
                    "kind": "decode",
                    "case_key": f"d{t}",
                    "mechanism": "linear",
                    "path": "chunk",
                    "pattern": "causal_self",
                    "mode": "decode",
                    "tokens": t,
                    "dtype": "float32",
                    "status": "ok",
                    "median_ms": 0.5,
                    "state_bytes": 8 * 64 * 65 * 4,
                },
            )
        for t in (256, 1024):
            for tau in (0.5, 1.0, 2.0):
                for inputs in ("random", "clustered"):
                    st.add(
                        run,
                        {
                            "kind": "fidelity",
                            "case_key": f"f{t}{tau}{inputs}",
                            "mechanism": "linear",
                            "pattern": "causal_self",
                            "mode": "fidelity",
                            "tokens": t,
                            "status": "ok",
                            "error": 0.1 * tau + t / 1e4,
                            "options": {"feature_map": "elu1"},
                            "extra": {"temperature": tau, "inputs": inputs},
                        },
                    )
        st.add(
            run,
            {
                **_speed("softmax", "reference", "causal_self", 65536, None, None),
                "case_key": "skip",
                "status": "skipped",
                "reason": "predicted 900 s exceeds the per-case time budget",
            },
        )
        add_quality_rows(st, run)
        st.finish_run(run)
    return db


def test_report_is_self_contained_and_complete(store_path, tmp_path):
    html = build_report(store_path, tmp_path / "report.html").read_text()
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html), "the report must not fetch anything"
    assert "<link" not in html and "@import" not in html
    for section in ("machine", "scaling", "speedup", "efficiency", "memory", "fidelity", "quality", "decode", "peers",
                    "problems"):  # fmt: skip
        assert f'id="{section}"' in html
    assert "local-attention" in html and "per-case time budget" in html and "abc123" in html
    assert html.count('<svg class="chart"') >= 2 + 2 + 2 + 2 + 2  # scaling, speed-up, memory, fidelity, decode


def test_report_opens_in_headless_chromium(store_path, tmp_path):
    chromium = chromium_or_skip()
    page = build_report(store_path, tmp_path / "report.html")
    profile = tmp_path / "profile"
    dom = subprocess.run(
        [
            chromium,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            "--enable-logging=stderr",
            "--v=0",
            "--virtual-time-budget=5000",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    console = [line for line in dom.stderr.splitlines() if "CONSOLE" in line]
    assert not console, f"console messages: {console}"
    body = re.search(r"<body[^>]*>", dom.stdout).group(0)
    charts = int(re.search(r'data-charts="(\d+)"', body).group(1))
    drawn = int(re.search(r'data-charts-drawn="(\d+)"', body).group(1))
    assert charts >= 10 and drawn == charts, body
    kinds = re.search(r'data-kinds-drawn="([a-z ]*)"', body).group(1).split()
    assert kinds == ["bars", "heatmap", "lines", "scatter"], body  # every kind of chart drew in the browser
    assert "data-js-errors" not in body

    shot = tmp_path / "report.png"
    subprocess.run(
        [
            chromium,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            "--window-size=1400,4000",
            f"--screenshot={shot}",
            page.as_uri(),
        ],
        capture_output=True,
        timeout=120,
        check=True,
    )
    assert shot.stat().st_size > 20_000
    keep = os.environ.get("ATTNKIT_SCREENSHOT_DIR")
    if keep:
        shutil.copy(shot, os.path.join(keep, "report.png"))


INJECT = '<script>alert("x")</script>'


def test_every_store_field_is_escaped(tmp_path):
    """A shared store is untrusted input: no field may reach the page as markup."""
    db = tmp_path / "evil.sqlite"
    with Store(db) as st:
        run = st.start_run(INJECT, {"device": INJECT, "torch_version": INJECT, "git_rev": INJECT}, INJECT,
                           matmul_gflops=1.0, matmul_dtype=INJECT)  # fmt: skip
        for t in LENGTHS:
            for mech, path in (("softmax", "sdpa"), ("linear", "chunk"), ("softmax", "reference")):
                row = _speed(mech, path, INJECT, t, t / 10, 10 * t, mode=INJECT, dtype=INJECT, device=INJECT,
                             doubtful=INJECT)  # fmt: skip
                st.add(run, row)
            st.add(run, {**_speed("linear", INJECT, "causal_self", t, None, None), "kind": INJECT, "status": INJECT,
                         "reason": INJECT})  # fmt: skip
            st.add(run, {"kind": "decode", "case_key": f"d{t}", "mechanism": INJECT, "path": INJECT,
                         "pattern": "causal_self", "mode": "decode", "tokens": t, "dtype": INJECT, "status": "ok",
                         "median_ms": 0.5, "state_bytes": 100, "doubtful": INJECT})  # fmt: skip
            st.add(run, {"kind": "fidelity", "case_key": f"f{t}", "mechanism": INJECT, "pattern": INJECT,
                         "mode": "fidelity", "tokens": t, "status": "ok", "error": 0.1, "options": {INJECT: INJECT},
                         "extra": {"temperature": 1.0, "inputs": INJECT}})  # fmt: skip
        for i, task in enumerate((INJECT, "passkey", "induction")):
            for mech in (INJECT, "softmax", "linear"):
                variants = {INJECT: 0.5, json.dumps({"length": INJECT, "depth": 0.5}): 0.4, '{"length": 32}': 0.3}
                row = _quality(mech, task, 0.5, pattern=INJECT, preset=INJECT, variants=variants, metric=INJECT,
                               version=INJECT, seed=INJECT)  # fmt: skip
                st.add(run, {**row, "case_key": f"q{i}{mech}", "options": {INJECT: INJECT} if i else {}})
    html = build_report(db, tmp_path / "evil.html").read_text()
    assert INJECT not in html and "<script>alert" not in html
    assert html.count("<script>") == 1  # the report's own check script


def test_the_report_opens_with_the_answer(store_path, tmp_path):
    html = build_report(store_path, tmp_path / "report.html").read_text()
    first = re.search(r'<section id="([a-z]+)"', html).group(1)
    assert first == "answer"
    answer = html[html.index('id="answer"') : html.index('id="scaling"')]
    # synthetic store: linear/chunk is the fastest overall (t/40 ms), SDPA the fastest exact at 1K
    rows = re.findall(r"<tr><td>(\w+)</td><td>(\d+)</td>.*?</tr>", answer)
    assert ("causal_self", "1024") in rows and ("noncausal_self", "1024") in rows
    row = re.search(r"<tr><td>causal_self</td><td>1024</td>(.*?)</tr>", answer).group(1)
    cells = re.findall(r"<td>(.*?)</td>", row)
    assert "SDPA softmax" in cells[1] and "linear/chunk" in cells[2], cells


def test_doubtful_figures_are_marked_and_counted(tmp_path):
    db = tmp_path / "d.sqlite"
    with Store(db) as st:
        run = st.start_run("r", {"device": "cpu", "threads": 2}, "test")
        for t in LENGTHS:
            st.add(run, _speed("softmax", "sdpa", "causal_self", t, t / 100, 10))
            busy = "busy: other processes used 1.9 cores" if t == 1024 else None
            st.add(run, _speed("linear", "chunk", "causal_self", t, t / 400, 10, speedup=4.0, doubtful=busy))
    html = build_report(db, tmp_path / "d.html").read_text()
    assert "1 doubtful" in html and 'class="doubt" title="busy: other processes used 1.9 cores"' in html


def test_charts_stay_readable_with_many_mechanisms(tmp_path):
    """Twelve mechanisms of one family: split over charts of at most 8 lines, never one unreadable chart."""
    from attnkit.report.charts import MAX_LINES

    db = tmp_path / "many.sqlite"
    with Store(db) as st:
        run = st.start_run("r", {"device": "cpu", "threads": 2}, "test")
        for t in LENGTHS:
            st.add(run, _speed("softmax", "sdpa", "causal_self", t, t / 100, 10))
            for i in range(12):
                st.add(run, _speed("linear", f"chunk{i}", "causal_self", t, t / (50 + i), 10, options={"eps": i}))
    html = build_report(db, tmp_path / "many.html").read_text()
    scaling = html[html.index('id="scaling"') : html.index('id="speedup"')]
    figures = scaling.split('<figure class="chart">')[1:]
    assert len(figures) >= 2
    for fig in figures:
        assert len(re.findall(r'<g id="series-\d+"', fig)) <= MAX_LINES


def _section(html: str, anchor: str, next_anchor: str) -> str:
    return html[html.index(f'<section id="{anchor}"') : html.index(f'<section id="{next_anchor}"')]


def _text(html: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", re.sub(r"<svg.*?</svg>", "", html, flags=re.S))).strip()


def test_quality_section_opens_with_the_answer_and_draws_its_heatmaps(store_path, tmp_path):
    html = build_report(store_path, tmp_path / "report.html").read_text()
    section = _section(html, "quality", "decode")
    assert _text(section).startswith("Quality: small models trained on each task The answer: quality against speed")
    kinds = re.findall(r'<svg class="chart" data-kind="(\w+)"', section)
    assert kinds[0] in ("scatter", "bars") and {"scatter", "bars", "heatmap", "lines"} <= set(kinds)
    first_board = section.index('id="quality-leaderboard"')
    assert section.index('data-kind="scatter"') < first_board < section.index('data-kind="heatmap"')
    # induction: 4 mechanisms x 4 test lengths, one path per cell, the number written in each
    induction = re.search(r'<svg class="chart" data-kind="heatmap" role="img" aria-label="induction.*?</svg>',
                          section, re.S).group(0)  # fmt: skip
    mesh = re.search(r'<g id="series-0">(.*?)</g>', induction, re.S).group(1)
    assert mesh.count("<path") == 16
    assert ">0.93<" in induction and ">0.12<" in induction  # softmax at 16 (mean of seeds), performer at 64
    passkey = re.search(r'aria-label="passkey: exact match.*?</svg>', section, re.S).group(0)
    assert re.search(r'<g id="series-0">(.*?)</g>', passkey, re.S).group(1).count("<path") == 4 * 6
    assert "no speed rows for causal_cross" in section  # the forecast rows' pattern: the ranking alone


REF = {
    "format": 1,
    "presets": {
        "quick": {
            "mqar": {"version": 1, "pattern": "causal_self", "higher_is_better": True, "mean": 0.5, "std": 0.1},
            "induction": {"version": 1, "pattern": "causal_self", "higher_is_better": True, "mean": 0.5, "std": 0.1},
        }
    },
}


def test_the_quality_answer_places_each_mechanism_at_the_chosen_length(tmp_path, monkeypatch):
    from attnkit.report import quality as report_quality

    monkeypatch.setattr(report_quality, "load_reference", lambda: REF)
    db = tmp_path / "qa.sqlite"
    with Store(db) as st:
        run = st.start_run("r", {"device": "cpu", "threads": 2}, "test")
        for t in LENGTHS:
            st.add(run, _speed("softmax", "sdpa", "causal_self", t, t / 100, 10, speedup=1.0))
            # linear's T=2048 is doubtful: at 2048 only 2 mechanisms are placed, at 1024 all 3
            busy = "busy" if t == 2048 else None
            st.add(run, _speed("linear", "chunk", "causal_self", t, t / 400, 10, speedup=4.0, doubtful=busy))
            if t < 2048:  # a slower path: linear's speed-up is its fastest path's
                st.add(run, _speed("linear", "recurrent", "causal_self", t, t / 200, 10, speedup=2.0))
            st.add(run, _speed("sliding_window", "blocked", "causal_self", t, t / 50, 10, speedup=0.5))
        # CI = mean z over mqar and induction (mu 0.5, sigma 0.1): softmax (4 + 2) / 2 = 3, linear -1,
        # sliding_window 2 (slower than softmax and worse: off the front), performer 0 (no speed rows)
        for mech, (mqar, induction) in {"softmax": (0.9, 0.7), "linear": (0.4, 0.4), "sliding_window": (0.8, 0.6),
                                        "performer": (0.5, 0.5)}.items():  # fmt: skip
            st.add(run, _quality(mech, "mqar", mqar))
            st.add(run, _quality(mech, "induction", induction))
    html = build_report(db, tmp_path / "qa.html").read_text()
    section = _section(html, "quality", "decode")
    scatter = re.search(r'<figure class="chart"><svg class="chart" data-kind="scatter".*?</figure>', section, re.S)
    caption = _text(re.search(r"<figcaption>(.*?)</figcaption>", scatter.group(0), re.S).group(1))
    assert "at T=1024" in caption and "Pareto front (linear, softmax)" in caption
    assert "Not placed (no such speed row at T=1024): performer" in caption
    points = re.findall(r'<g id="series-(\d+)">', scatter.group(0))
    assert len(points) == 3 and 'id="pareto-front"' in scatter.group(0)
    board = _text(section[section.index('id="quality-leaderboard"') :])
    assert "softmax +3.00 2 1.00×" in board and "linear -1.00 2 4.00×" in board and "performer +0.00 2 0.500" in board
    # then induction and mqar, each with its difference from softmax
    assert "sliding_window +2.00 2 0.50× 0.600 -0.100 0.800 -0.100" in board


def test_quality_without_speed_rows_says_so_and_ranks_alone(tmp_path, monkeypatch):
    from attnkit.report import quality as report_quality

    monkeypatch.setattr(report_quality, "load_reference", lambda: REF)
    db = tmp_path / "q.sqlite"
    with Store(db) as st:
        run = st.start_run("r", {"device": "cpu", "threads": 2}, "test")
        for mech, score in (("softmax", 0.9), ("linear", 0.3), ("performer", 0.6)):
            st.add(run, _quality(mech, "mqar", score))
    section = _section(build_report(db, tmp_path / "q.html").read_text(), "quality", "decode")
    assert "This store has no speed rows for causal_self" in _text(section)
    assert 'data-kind="scatter"' not in section
    bars = re.search(r'<svg class="chart" data-kind="bars".*?</svg>', section, re.S).group(0)
    labels = re.findall(r">(softmax|linear|performer)<", bars)
    assert labels == ["softmax", "performer", "linear"]  # the ranking, best first
    assert len(re.findall(r'<g id="series-\d+">', bars)) == 3


def test_quality_details_show_model_free_baselines_and_the_ratio_to_softmax(tmp_path):
    db = tmp_path / "q.sqlite"
    with Store(db) as st:
        run = st.start_run("r", {"device": "cpu", "threads": 2}, "test")
        for mech, mse in (("softmax", 0.0004), ("linear", 0.0008)):
            row = _quality(mech, "forecast", mse, pattern="noncausal_cross", baseline={"seasonal_naive_mse": 0.00047})
            row["extra"].update(metric="mse", higher_is_better=False)
            st.add(run, row)
    text = _text(_section(build_report(db, tmp_path / "q.html").read_text(), "quality", "decode"))
    assert "seasonal_naive_mse 0.00047" in text
    assert re.search(r"linear\s+mse\s+0\.0008\s+\+0\.0004 \(1\)\s+2\b", text), "Δ and the ratio to softmax"


def test_speed_rows_with_default_options_match_quality_rows_without_options():
    from types import SimpleNamespace

    from attnkit.report.quality import _speed_label

    def curve(options):
        return SimpleNamespace(mechanism="sliding_window", options=options)

    assert _speed_label(curve("window=256")) == "sliding_window", "speed rows record the default window"
    assert _speed_label(curve("window=64")) == "sliding_window window=64"
    assert _speed_label(curve("")) == "sliding_window"
    assert _speed_label(SimpleNamespace(mechanism="no_such_mechanism", options="k=1")) == "no_such_mechanism k=1"


def test_fidelity_groups_families_with_kernel_first():
    from attnkit.report import sections

    def row(mech, knob, value, t, tau, err):
        return {"kind": "fidelity", "status": "ok", "mechanism": mech, "pattern": "noncausal_self", "tokens": t,
                "error": err, "options": {knob: value}, "extra": {"temperature": tau, "inputs": "random"}}  # fmt: skip

    rows = [
        row(mech, knob, value, t, tau, 0.01 * value + t / 1e5)
        for mech, knob in (("sliding_window", "window"), ("performer", "num_features"), ("sigmoid", "bias"))
        for value in (1, 2)
        for t in (256, 1024)
        for tau in (1.0, 2.0)
    ]
    html = sections.fidelity(rows)
    titles = list(dict.fromkeys(re.findall(r"Error vs T: ([^,]+),", html)))  # a title appears twice in a chart
    assert titles == ["kernel (linear)", "fixed and estimated sparse", "softmax variants"]
    table = html[html.index("<table") : html.index("</table>")]
    # one row per mechanism, kernel family first; the cells give every knob value's error at the longest T
    assert table.index("performer") < table.index("sliding_window")
    assert "window=1: 0.0202" in table and "window=2: 0.0302" in table
    assert html.count("<tr>") == 1 + 3


def test_fidelity_charts_draw_the_default_knob_and_the_table_every_value():
    from attnkit.report import sections

    rows = [
        {"kind": "fidelity", "status": "ok", "mechanism": "performer", "pattern": "causal_self", "tokens": t,
         "error": m / 1000, "options": {"num_features": m}, "extra": {"temperature": 1.0, "inputs": "random"}}
        for m in (64, 256)
        for t in (256, 1024)
    ]  # fmt: skip
    html = sections.fidelity(rows)
    charts = html[html.index("</table>") :]
    assert "num_features=256" in charts and "num_features=64" not in charts  # 256 is performer's default
    table = html[: html.index("</table>")]
    assert "num_features=64: 0.064" in table and "num_features=256: 0.256" in table
