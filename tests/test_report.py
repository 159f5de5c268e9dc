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
