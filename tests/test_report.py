"""The HTML report: self-contained, every section present, and every chart drawn in a real browser."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from attnkit.bench.store import Store
from attnkit.report import build_report

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
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
        st.finish_run(run)
    return db


def test_report_is_self_contained_and_complete(store_path, tmp_path):
    html = build_report(store_path, tmp_path / "report.html").read_text()
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html), "the report must not fetch anything"
    assert "<link" not in html and "@import" not in html
    for section in ("machine", "scaling", "speedup", "efficiency", "memory", "fidelity", "decode", "peers", "problems"):
        assert f'id="{section}"' in html
    assert "local-attention" in html and "per-case time budget" in html and "abc123" in html
    assert html.count('<svg class="chart"') >= 2 + 2 + 2 + 2 + 2  # scaling, speed-up, memory, fidelity, decode


def test_report_opens_in_headless_chromium(store_path, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        if os.environ.get("ATTNKIT_REQUIRE_CHROMIUM"):
            pytest.fail("chromium is required here (ATTNKIT_REQUIRE_CHROMIUM) but not installed")
        pytest.skip("chromium is not installed (.ci/run installs the Debian package)")
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
