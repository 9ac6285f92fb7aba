"""The report's publishing outputs: LaTeX, HTML, efficiency length, Pareto fronts and task sections."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import make_row

from bench import report
from bench.report.efficiency import crossover, efficiency_lengths
from bench.report.pareto import pareto_mask, pareto_points
from bench.report.rows import load_results, prepare
from bench.report.summary import summarise
from bench.results import write_row

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def campaign(results: Path) -> None:
    """Exact softmax (torch) and a linear-time kernel over three lengths, an interpreted run, failures, needle rows."""
    for kv in (1024, 2048, 4096):
        for method, impl, latency, fidelity in (("softmax", "torch", 1e-6 * kv**2, 2e-4),
                                                ("linear", "triton", 1e-3 * kv, 3e-2)):  # fmt: skip
            write_row(results, make_row(f"{impl}-{kv}", method=method, impl=impl, seq_len=kv, kv_len=kv,
                                        latency_ms=latency, latency_ms_p10=0.9 * latency, latency_ms_p90=1.1 * latency,
                                        peak_mem_bytes=int(64 * kv), fidelity_rel=fidelity))  # fmt: skip
        write_row(results, make_row(f"interp-{kv}", method="linear", impl="triton_interp", interpreted=True,
                                    seq_len=kv, kv_len=kv, latency_ms=777.0))  # fmt: skip
    write_row(results, make_row("oom-1", seq_len=65536, kv_len=65536, status="oom", reason="CUDA out of memory",
                                latency_ms=None, latency_samples_ms=None))  # fmt: skip
    write_row(results, make_row("err-1", method="linear", impl="triton", status="error", reason="RuntimeError: boom",
                                latency_ms=None, latency_samples_ms=None))  # fmt: skip
    for n in (1024, 2048):
        for depth in (0.0, 0.5, 1.0):
            for impl, hits in (("torch", 16), ("triton", 8)):
                write_row(results, make_row(f"needle-{impl}-{n}-{depth}", task="needle", impl=impl,
                                            method="softmax" if impl == "torch" else "linear", seq_len=n, kv_len=n,
                                            depth=depth, beta=8.0, variant="single", needles=1, distractor_sim=0.75,
                                            accuracy=hits / 16, hits=hits, trials=16))  # fmt: skip


@pytest.fixture(scope="module")
def outputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    results = tmp_path_factory.mktemp("results")
    campaign(results)
    report.write_report(results, baseline=("softmax", "torch"))  # the campaign's exact-softmax impl
    return results / "report"


def test_latex_is_booktabs_escaped_and_leads_with_the_summary(outputs: Path) -> None:
    tex = (outputs / "leaderboard.tex").read_text()
    assert tex.count(r"\begin{tabular}") == tex.count(r"\bottomrule") >= 5
    assert r"\toprule" in tex and r"\midrule" in tex
    assert tex.split(r"\caption{", 1)[1].startswith("Summary")
    assert r"$\times$" in tex and "×" not in tex and r"$\downarrow$" in tex  # B×H×D and ↓ made LaTeX-safe
    assert "Triton CPU interpreter" in tex  # interpreted rows in their own, captioned table
    assert "RuntimeError: boom" in tex and "Not measured" in tex
    assert "Needle retrieval" in tex  # the task's own section, as a table too
    for line in tex.splitlines():  # every unescaped special character would break the build
        if line.endswith(r"\\") and not line.startswith("\\"):
            assert not re.search(r"(?<!\\)[_%#&]", line.replace(r"\\", "").replace(" & ", " ")), line


def test_html_is_self_contained_and_complete(outputs: Path) -> None:
    page = (outputs / "index.html").read_text()
    assert not re.search(r"(src|href)=[\"']?(https?:)?//", page)  # no CDN, no remote anything
    assert page.count("data:image/png;base64,") >= 5  # latency, memory, % peak, efficiency, Pareto, heat maps
    summary = page.split('id="summary"')[1].split("</table>")[0]
    assert summary.count("<tr>") == 1 + 2  # header + softmax/torch and linear/triton; never the interpreted run
    assert "triton_interp" not in summary
    per_cell = re.findall(r'<tr id="cell-([^"]+)"', page)
    assert len(per_cell) == 6 + 3 + 12  # compiled scaling, interpreted scaling (own table), needle
    assert 'title="cell triton-1024"' in page and 'href="#cell-triton-1024"' in page
    assert page.count("<details>") >= 3  # per-cell tables fold
    assert "Not measured" in page and "CUDA out of memory" in page and "RuntimeError: boom" in page
    assert '<select name="task">' in page and '<select name="pattern">' in page and '<select name="dtype">' in page


def test_html_provenance_is_a_list_not_markdown(outputs: Path) -> None:
    page = (outputs / "index.html").read_text()
    provenance = page.split("<h2>Provenance</h2>")[1].split("<h2>", 1)[0]
    assert provenance.startswith('<ul class="prov">') and "<li><strong>Git commit(s)</strong>:" in provenance
    assert "`" not in provenance and "- " not in provenance


def test_markdown_gains_task_sections_and_plots(outputs: Path) -> None:
    md = (outputs / "leaderboard.md").read_text()
    assert "## Needle retrieval" in md and "## Efficiency length" in md
    assert md.index("## Task: scaling") < md.index("## Needle retrieval")  # task sections after the generic tables
    for name in ("pct_peak_vs_seq_len.png", "pareto_scaling.png", "pareto_needle.png", "efficiency_length.png"):
        assert (outputs / name).read_bytes().startswith(PNG_MAGIC)
        assert f"]({name})" in md
    assert list(outputs.glob("needle_*.png"))


def test_known_crossover() -> None:
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
        rows.append(make_row(f"n{n}", method="linear", impl="reference", task="needle", seq_len=n, kv_len=n,
                             latency_ms=1e-9))  # another task at the same lengths: not a curve  # fmt: skip
    eff = efficiency_lengths(pd.DataFrame(rows)).set_index("metric")
    assert len(eff) == 2
    assert eff.loc["time", "efficiency_length"] == pytest.approx(2000.0, rel=1e-6)
    assert eff.loc["time", "meaning"] == "cheaper beyond" and not eff.loc["time", "extrapolated"]
    assert eff.loc["memory", "meaning"] in ("cheaper beyond", "cheaper below")  # fitted, whatever the side
    other = efficiency_lengths(pd.DataFrame(rows), baseline=("linear", "reference")).set_index("metric")
    assert other.loc["time", "method"] == "softmax" and other.loc["time", "meaning"] == "cheaper below"


def test_pareto_mask() -> None:
    cost = np.array([1.0, 2.0, 3.0, 2.5])
    quality = np.array([0.5, 0.9, 0.95, 0.8])  # the last is dominated by the second
    assert pareto_mask(cost, quality).tolist() == [True, True, True, False]


def test_pareto_points_are_the_declared_summary_columns(tmp_path: Path) -> None:
    campaign(tmp_path)
    summaries, _ = summarise(prepare(load_results(tmp_path)[0]))
    by_task = {s.task: s for s in summaries}
    pts, cost, quality = pareto_points(by_task["scaling"])  # (latency, fidelity error: lower is better)
    assert (cost.metric.name, quality.metric.name) == ("latency_ms", "fidelity_rel")
    assert dict(zip(pts["_label"], pts["quality"], strict=True)) == {"softmax/torch": 2e-4, "linear/triton": 3e-2}
    assert pts.set_index("_label").loc["softmax/torch", "cost"] == pytest.approx(1e-6 * 4096**2)
    pts, cost, quality = pareto_points(by_task["needle"])  # (latency, hit rate: higher is better)
    assert quality.metric.better == "higher" and not cost.in_table  # the needle call's latency: an axis only
    assert dict(zip(pts["_label"], pts["quality"], strict=True)) == {"softmax/torch": 1.0, "linear/triton": 0.5}


def test_report_with_only_failed_rows(tmp_path: Path) -> None:
    write_row(tmp_path, make_row("a", status="oom", reason="out of memory", latency_ms=None, latency_samples_ms=None))
    path = report.write_report(tmp_path)
    text = path.read_text()
    assert "out of memory" in text and "No task gave a summary column" in text
    assert "out of memory" in (path.parent / "index.html").read_text()
    assert "out of memory" in (path.parent / "leaderboard.tex").read_text()


# ---------------------------------------------------------------- figures drawn in a forked child


def report_files(out: Path) -> dict[str, bytes]:
    """Every output file's bytes, the one line that holds the build time blanked."""
    files = {}
    for p in sorted(out.iterdir()):
        data = p.read_bytes()
        files[p.name] = re.sub(rb"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", b"TIME", data) if p.suffix != ".png" else data
    return files


def test_figures_drawn_in_a_child_are_the_same_files(outputs: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Forced to fork (the campaign is small; an earlier test's daemon threads, e.g. tqdm's monitor, would veto
    it), the report's files are byte for byte the ones drawn here: the context-length figures in one child,
    the needle heat maps (a task's figures, through `background.draw`) in a second."""
    import os

    import bench.report.background as background

    monkeypatch.setattr(background, "MIN_ROWS", 0)
    monkeypatch.setattr(background.FigureDrawer, "_can_fork", staticmethod(lambda: True))
    forks, real_fork = [], os.fork
    monkeypatch.setattr(background.os, "fork", lambda: forks.append(1) or real_fork())
    report.write_report(outputs.parent, tmp_path, baseline=("softmax", "torch"))
    assert len(forks) == 2
    assert report_files(tmp_path) == report_files(outputs)


def test_a_child_that_fails_is_covered_by_drawing_here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    import bench.report.plots as plots
    from bench.report.background import FigureDrawer

    results = tmp_path / "results"
    campaign(results)
    rows = prepare(load_results(results)[0])
    here = plots.context_plots(rows, tmp_path)[0]
    expected = {p.name: p.read_bytes() for p in here}
    for p in here:
        p.unlink()
    parent, real_plot = os.getpid(), plots.plot_figure

    def fails_in_the_child(*args):
        if os.getpid() != parent:
            raise RuntimeError("child broke")
        return real_plot(*args)

    monkeypatch.setattr(plots, "plot_figure", fails_in_the_child)
    monkeypatch.setattr(FigureDrawer, "_can_fork", staticmethod(lambda: True))
    with FigureDrawer(min_rows=0) as drawer:
        paths = plots.context_plots(rows, tmp_path)[0]
        assert len(drawer.jobs) == 3 and not any(p.exists() for p in paths)
        drawer.start(len(rows))
        assert len(drawer.children) == 1 and drawer.jobs == []
        drawer.finish()
    assert {p.name: p.read_bytes() for p in paths} == expected


def test_no_fork_while_another_thread_runs() -> None:
    """A fork copies only the calling thread: a lock another thread holds would stay held in the child."""
    import threading

    from bench.report.background import FigureDrawer

    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    try:
        with FigureDrawer(min_rows=0) as drawer:
            drawer.jobs.append((lambda: None, ()))
            drawer.start(10)
            assert drawer.children == [] and len(drawer.jobs) == 1
            drawer.finish()
            assert drawer.jobs == []
    finally:
        stop.set()
        other.join()
