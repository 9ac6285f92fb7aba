"""index.html in a real headless browser: the leaderboard has its rows and sorts when a header is clicked.

The page's own test hook (`?test-sort=N`) clicks header N on load and writes
the first row into `<pre id="test-result">`; `chromium --dump-dom` returns the
DOM after scripts ran, so no browser driver is needed.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from test_report import make_row

from bench import report
from bench.report_html import COLUMNS
from bench.results import write_row

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium not installed (apt-get install -y chromium; .ci/run installs it)"
)
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--virtual-time-budget=3000")  # fmt: skip


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> Path:
    results = tmp_path_factory.mktemp("results")
    for i, (method, latency) in enumerate((("b_mid", 2.0), ("a_slow", 9.0), ("c_fast", 0.5))):
        write_row(results, make_row(f"cell-{method}", method=method, latency_ms=latency, latency_samples_ms=[latency],
                                    seq_len=1024 * (i + 1), kv_len=1024 * (i + 1)))  # fmt: skip
    write_row(results, make_row("failed", method="d_oom", status="oom", reason="out of memory", latency_ms=None))
    return report.write_report(results).parent / "index.html"


def dump_dom(page: Path, query: str, profile: Path) -> str:
    cmd = [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--dump-dom", page.as_uri() + query]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_rows_and_click_sort(page: Path, tmp_path: Path) -> None:
    col = {h: i for i, (_, h, _) in enumerate(COLUMNS)}
    dom = dump_dom(page, f"?test-sort={col['latency ms']}", tmp_path / "p1")
    result = re.search(r'<pre id="test-result">(.*?)</pre>', dom, re.S).group(1)
    assert "rows: 3" in result  # the failed cell is not a leaderboard row ...
    assert result.startswith("first-row: scaling | c_fast") and "sorted: asc" in result  # ... fastest first
    assert "out of memory" in dom  # ... it is listed under Not measured
    dom = dump_dom(page, f"?test-sort={col['method']}&test-desc=1", tmp_path / "p2")
    result = re.search(r'<pre id="test-result">(.*?)</pre>', dom, re.S).group(1)
    assert result.startswith("first-row: scaling | c_fast") and "sorted: desc" in result
    dom = dump_dom(page, f"?test-sort={col['kv']}", tmp_path / "p3")  # numeric sort, not text: 1024 < 2048 < 3072
    assert re.search(r'<pre id="test-result">first-row: scaling \| b_mid', dom)
