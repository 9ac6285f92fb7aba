"""The report's publishing outputs: LaTeX, HTML, efficiency length, Pareto fronts and task sections."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_report import PNG_MAGIC, make_row, write_sweep

from bench import report
from bench.efficiency import crossover, efficiency_lengths, fit_power_law
from bench.report_plots import pareto_mask
from bench.results import write_row


@pytest.fixture(scope="module")
def outputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One report over the shared sweep (ok, interpreted, oom, error rows) plus a few needle rows."""
    results = tmp_path_factory.mktemp("results")
    write_sweep(results)
    write_row(results, make_row("err-1", method="flash", impl="triton", status="error", reason="RuntimeError: boom",
                                latency_ms=None, latency_samples_ms=None))  # fmt: skip
    for n in (1024, 2048):
        for depth in (0.0, 0.5, 1.0):
            write_row(results, make_row(f"needle-{n}-{depth}", task="needle", seq_len=n, kv_len=n, depth=depth,
                                        variant="single", accuracy=1.0 if depth < 1 else 0.5))  # fmt: skip
    report.write_report(results, baseline=("softmax", "torch"))  # the sweep's exact-softmax impl
    return results / "report"


def test_latex_is_booktabs_and_escaped(outputs: Path) -> None:
    tex = (outputs / "leaderboard.tex").read_text()
    assert tex.count(r"\begin{tabular}") == tex.count(r"\bottomrule") >= 3
    assert r"\toprule" in tex and r"\midrule" in tex
    assert r"$\times$" in tex and "×" not in tex  # B×H×D made LaTeX-safe
    assert "Triton CPU interpreter" in tex  # interpreted rows in their own, captioned table
    assert "RuntimeError: boom" in tex and "Cells not measured" in tex
    for line in tex.splitlines():  # every unescaped special character would break the build
        if line.endswith(r"\\") and not line.startswith("\\"):
            assert not re.search(r"(?<!\\)[_%#]", line), line


def test_html_is_self_contained_and_complete(outputs: Path) -> None:
    page = (outputs / "index.html").read_text()
    assert not re.search(r"(src|href)=[\"']?(https?:)?//", page)  # no CDN, no remote anything
    assert page.count("data:image/png;base64,") >= 4  # latency, memory, % peak, Pareto, heat maps
    leaderboard = page.split('id="leaderboard"')[1].split("</table>")[0]
    assert leaderboard.count("<tr id=\"cell-") == 12 + 6  # 12 compiled scaling + 6 needle rows
    assert 'id="cell-flash-c-1024"' in leaderboard and 'title="cell flash-c-1024"' in leaderboard
    assert "triton_interp" not in leaderboard and 'id="interpreted"' in page  # never mixed with compiled rows
    assert "Not measured" in page and "CUDA out of memory" in page and "RuntimeError: boom" in page
    assert '<select name="task">' in page and '<select name="pattern">' in page and '<select name="dtype">' in page


def test_markdown_gains_task_sections_and_plots(outputs: Path) -> None:
    md = (outputs / "leaderboard.md").read_text()
    assert "## Needle retrieval" in md and "## Efficiency length" in md
    for name in ("pct_peak_vs_seq_len.png", "pareto_scaling.png", "efficiency_length.png"):
        assert (outputs / name).read_bytes().startswith(PNG_MAGIC)
        assert f"]({name})" in md
    assert list(outputs.glob("needle_*.png"))


def test_power_law_fit_and_known_crossover() -> None:
    n = np.array([512, 1024, 2048, 4096, 8192], float)
    a, k = fit_power_law(n, 3e-6 * n**2)
    assert a == pytest.approx(3e-6) and k == pytest.approx(2.0)
    # 1e-6 N^2 (exact) against 1e-3 N (linear): they cross at N = 1000, the linear one cheaper beyond.
    assert crossover(1e-3, 1.0, 1e-6, 2.0) == (pytest.approx(1000.0), "cheaper beyond")
    assert crossover(1e-6, 2.0, 1e-6, 2.0)[1] == "never cheaper"


def test_efficiency_lengths_from_rows() -> None:
    rows = []
    for n in (512, 1024, 2048, 4096):
        rows.append(make_row(f"s{n}", impl="sdpa", seq_len=n, kv_len=n, latency_ms=1e-6 * n**2,
                             peak_mem_bytes=int(64 * n)))  # fmt: skip
        rows.append(make_row(f"l{n}", method="linear", impl="reference", seq_len=n, kv_len=n, latency_ms=2e-3 * n,
                             peak_mem_bytes=int(16 * n) + 2**20))  # fmt: skip
    eff = efficiency_lengths(pd.DataFrame(rows)).set_index("metric")
    assert eff.loc["time", "efficiency_length"] == pytest.approx(2000.0, rel=1e-6)
    assert eff.loc["time", "meaning"] == "cheaper beyond" and not eff.loc["time", "extrapolated"]
    assert eff.loc["memory", "meaning"] in ("cheaper beyond", "cheaper below")  # fitted, whatever the side
    other = efficiency_lengths(pd.DataFrame(rows), baseline=("linear", "reference")).set_index("metric")
    assert other.loc["time", "method"] == "softmax" and other.loc["time", "meaning"] == "cheaper below"


def test_pareto_mask() -> None:
    cost = np.array([1.0, 2.0, 3.0, 2.5])
    quality = np.array([0.5, 0.9, 0.95, 0.8])  # the last is dominated by the second
    assert pareto_mask(cost, quality).tolist() == [True, True, True, False]


def test_report_with_only_failed_rows(tmp_path: Path) -> None:
    write_row(tmp_path, make_row("a", status="oom", reason="out of memory", latency_ms=None, latency_samples_ms=None))
    path = report.write_report(tmp_path)
    assert "out of memory" in path.read_text()
    assert "out of memory" in (path.parent / "index.html").read_text()
    assert "out of memory" in (path.parent / "leaderboard.tex").read_text()
