"""Headless Chromium for the page tests (the benchmark report, the analysis page): find it or skip, dump the
rendered DOM with the console on stderr, take a screenshot."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

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


def chromium_or_skip() -> str:
    """The chromium binary; skips the test without one, fails it under ATTNKIT_REQUIRE_CHROMIUM."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        if os.environ.get("ATTNKIT_REQUIRE_CHROMIUM"):
            pytest.fail("chromium is required here (ATTNKIT_REQUIRE_CHROMIUM) but not installed")
        pytest.skip("chromium is not installed (.ci/run installs the Debian package)")
    return chromium


def dump_dom(chromium: str, url: str, profile: Path) -> tuple[str, list[str]]:
    """``(the DOM after load, the console lines)`` of ``url``."""
    run = subprocess.run(
        [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
         "--virtual-time-budget=5000", "--dump-dom", url],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout, [line for line in run.stderr.splitlines() if "CONSOLE" in line]


def screenshot(chromium: str, url: str, shot: Path, profile: Path, size: str = "1400,4000") -> Path:
    """A PNG of ``url`` at ``size``; copied to ATTNKIT_SCREENSHOT_DIR when that is set."""
    subprocess.run(
        [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={size}", f"--screenshot={shot}", url],
        capture_output=True, timeout=120, check=True,
    )  # fmt: skip
    keep = os.environ.get("ATTNKIT_SCREENSHOT_DIR")
    if keep:
        shutil.copy(shot, os.path.join(keep, shot.name))
    return shot
