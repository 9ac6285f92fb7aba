"""index.html in a real headless browser: the summary and the per-cell tables sort when a header is clicked.

The page's own test hook (`?test-sort=N[&test-desc=1][&test-table=ID]`) clicks
header N of table ID (the summary by default) on load and writes the first row
into `<pre id="test-result">`; `chromium --dump-dom` returns the DOM after
scripts ran, so no browser driver is needed.
"""

from __future__ import annotations

import html
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import make_row

from bench import report
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
    for method, latency in (("b_mid", 2.0), ("a_slow", 9.0), ("c_fast", 0.5)):
        for kv in (1024, 2048):
            write_row(results, make_row(f"{method}-{kv}", method=method, latency_ms=latency * kv / 1024,
                                        latency_samples_ms=[latency], seq_len=kv, kv_len=kv))  # fmt: skip
    write_row(results, make_row("failed", method="d_oom", status="oom", reason="out of memory", latency_ms=None))
    return report.write_report(results).parent / "index.html"


def headers(page: Path, table_id: str) -> list[str]:
    table = page.read_text().split(f'id="{table_id}"', 1)[1].split("</thead>", 1)[0]
    return [html.unescape(h) for h in re.findall(r"<th>(.*?)</th>", table)]


def sorted_result(page: Path, query: str, profile: Path) -> str:
    cmd = [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--dump-dom", page.as_uri() + query]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    match = re.search(r'<pre id="test-result">(.*?)</pre>', done.stdout, re.S)
    assert match and match.group(1), "the page's test hook wrote nothing"
    return html.unescape(match.group(1))


def test_summary_sorts_on_click(page: Path, tmp_path: Path) -> None:
    col = {h.split(" @ ")[0]: i for i, h in enumerate(headers(page, "summary"))}
    result = sorted_result(page, f"?test-sort={col['scaling: latency (ms) ↓']}", tmp_path / "p1")
    assert result.startswith("first-row: 1 | c_fast") and "rows: 3" in result and "sorted: asc" in result
    result = sorted_result(page, f"?test-sort={col['method']}&test-desc=1", tmp_path / "p2")
    assert result.startswith("first-row: 1 | c_fast") and "sorted: desc" in result
    result = sorted_result(page, f"?test-sort={col['mean rank']}&test-desc=1", tmp_path / "p3")
    assert result.startswith("first-row: 3 | a_slow")  # numeric, not text: the worst rank last ascending


def test_per_cell_table_sorts_by_point_and_latency(page: Path, tmp_path: Path) -> None:
    col = {h: i for i, h in enumerate(headers(page, "cells-0"))}
    assert list(col)[:4] == ["method", "impl", "point", "latency (ms) ↓"]  # latency visible, keys compact
    result = sorted_result(page, f"?test-table=cells-0&test-sort={col['point']}&test-desc=1", tmp_path / "p4")
    assert re.match(r"first-row: \w+ \| torch \| N=2048", result) and "rows: 6" in result  # failed cell: not a row
    result = sorted_result(page, f"?test-table=cells-0&test-sort={col['latency (ms) ↓']}", tmp_path / "p5")
    assert result.startswith("first-row: c_fast | torch | N=1024 | 0.5")  # numeric sort on the value


def test_anchor_unfolds_its_table(page: Path, tmp_path: Path) -> None:
    cmd = [CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'p6'}", "--dump-dom", page.as_uri() + "#cell-a_slow-2048"]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout
    assert re.search(r'<details open="">.*id="cell-a_slow-2048"', dom, re.S)
    assert "out of memory" in dom  # the failed cell is listed under Not measured
