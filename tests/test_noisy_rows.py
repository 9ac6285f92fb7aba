"""Rows the interference probe found disturbed (issue 14): one rule (`bench.disturbed`), marked in every report
table and timing plot, stated at the top of the report; compare's side is in tests/test_compare.py."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
from helpers import make_row

from bench import report
from bench.disturbed import LABEL, MARK, describe, disturbed_mask, flag, is_disturbed, is_timing_metric
from bench.report.efficiency import efficiency_lengths
from bench.report.pareto import pareto_figure
from bench.report.plots import context_figure, figure_rows, plot_data
from bench.report.rows import prepare
from bench.report.slopes import scaling_slopes
from bench.report.summary import summarise
from bench.results import COMPACTED_NAME, load, write_row

LENGTHS = (1024, 2048, 4096)
NOISY = dict(noisy=True, probe_slowdown=3.2, latency_cv=0.4)
QUIET = dict(noisy=False, probe_slowdown=1.05, latency_cv=0.02)


def sweep(results: Path, disturbed: dict[tuple[str, int, bool], dict] | None = None, probe: dict | None = None) -> None:
    """softmax/sdpa and linear/reference over three lengths, both patterns; `disturbed` flags chosen cells,
    `probe` is what every other row says (None: rows written before the probe, without the columns)."""
    for impl, method, per_token in (("sdpa", "softmax", 2e-6), ("reference", "linear", 1e-3)):
        for kv in LENGTHS:
            for causal in (True, False):
                latency = per_token * kv ** (2 if method == "softmax" else 1)
                extra = (disturbed or {}).get((method, kv, causal), probe or {})
                write_row(results, make_row(f"{method}-{kv}-{causal}", method=method, impl=impl, seq_len=kv,
                                            kv_len=kv, causal=causal, latency_ms=latency,
                                            latency_ms_p10=0.9 * latency, latency_ms_p90=1.1 * latency,
                                            peak_mem_bytes=int(kv * 2**12), **extra))  # fmt: skip


def table_row(md: str, heading: str, method: str, point: str) -> list[str]:
    """The cells of one row of the first per-cell table under `heading`."""
    body = md.split(heading, 1)[1]
    lines = [line for line in body.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] == method and cells[2] == point:
            return dict(zip(header, cells, strict=True))
    raise AssertionError(f"no row {method} {point} under {heading}")


# ---------------------------------------------------------------- the rule


@pytest.mark.parametrize(("value", "expected"), [(True, True), (1, True), ("true", True), (False, False), (None, False),
                                                 (float("nan"), False), (pd.NA, False), ("False", False)])  # fmt: skip
def test_flag_reads_only_a_real_true(value: object, expected: bool) -> None:
    assert flag(value) is expected


def test_noisy_or_throttled_is_disturbed_and_says_why() -> None:
    assert is_disturbed({"noisy": True}) and is_disturbed({"throttled": True}) and not is_disturbed({})
    assert describe({"noisy": True, "probe_slowdown": 3.14}) == "probe 3.1x slower than idle"
    assert describe({"noisy": True, "throttled": True}) == "flagged noisy, GPU clocks throttled"
    assert describe({"noisy": True, "probe_slowdown": 1.1, "runqueue_wait": 0.414}) == (
        "probe 1.1x slower than idle, threads waited 41% of the time for a core")
    assert describe({"noisy": False, "probe_slowdown": 1.1, "runqueue_wait": 0.414}) == ""
    assert describe({"noisy": False, "probe_slowdown": 9.0}) == ""
    frame = pd.DataFrame({"noisy": [True, None, False, float("nan")], "throttled": [None, True, None, None]})
    assert disturbed_mask(frame).tolist() == [True, True, False, False]
    assert disturbed_mask(pd.DataFrame({"x": [1]})).tolist() == [False]


def test_timing_metrics_by_declaration() -> None:
    """Only values from the clock are distrusted: memory, accuracy and fidelity stay trustworthy."""
    timing = [("latency_ms", "ms", "samples"), ("pct_peak", "%", None), ("tflops", "TFLOP/s", None),
              ("train_seconds", "s", None), ("tokens_per_s", "tokens/s", None), ("step_ms", "ms", None)]  # fmt: skip
    other = [("peak_mem_bytes", "bytes", None), ("accuracy", "fraction", "drop"), ("fidelity_rel", "", "growth")]
    assert all(is_timing_metric(*m) for m in timing)
    assert not any(is_timing_metric(*m) for m in other)


# ---------------------------------------------------------------- the report's outputs


@pytest.fixture(scope="module")
def noisy_report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    results = tmp_path_factory.mktemp("noisy")
    sweep(results, {("linear", 2048, True): NOISY}, QUIET)
    report.write_report(results, baseline=("softmax", "sdpa"))
    return results / "report"


def test_header_counts_the_disturbed_rows_in_every_output(noisy_report: Path) -> None:
    line = "Timing: 1 of 12 timed rows were disturbed (noisy; probe up to 3.2x slower than idle) and are marked"
    md = (noisy_report / "leaderboard.md").read_text()
    assert md.splitlines()[2].startswith(f"{line} {MARK}")  # right under the title, before the summary
    tex = (noisy_report / "leaderboard.tex").read_text()
    assert f"% {line} $^{{\\dagger}}$" in tex.split(r"\begin{table}", 1)[0]
    html = (noisy_report / "index.html").read_text()
    assert html.index(f'<p class="lead">{line} {MARK}') < html.index("<h2>Summary</h2>")


def test_markdown_marks_the_timing_values_of_the_disturbed_row_only(noisy_report: Path) -> None:
    md = (noisy_report / "leaderboard.md").read_text()
    row = table_row(md, "### causal self · fwd · float16", "linear", "N=2048")
    assert row["latency (ms) ↓"].endswith(MARK) and row["TFLOP/s ↑"].endswith(MARK)
    assert row["% of peak ↑"].endswith(MARK)
    memory = next(v for k, v in row.items() if k.startswith("peak memory"))
    assert not memory.endswith(MARK) and not row["fidelity (rel. error vs fp64) ↓"].endswith(MARK)
    quiet = table_row(md, "### causal self · fwd · float16", "linear", "N=4096")
    assert not any(v.endswith(MARK) for v in quiet.values())
    other = md.split("### non-causal self · fwd · float16", 1)[1].split("##", 1)[0]
    assert MARK not in other  # a table without a marked value gets no note
    causal = md.split("### causal self · fwd · float16", 1)[1].split("###", 1)[0]
    assert f"\n{MARK} disturbed: the interference probe" in causal  # the note, under the table


def test_latex_and_html_mark_the_same_value(noisy_report: Path) -> None:
    tex = (noisy_report / "leaderboard.tex").read_text()
    assert "linear & reference & N=2048 & 2.05 [1.84--2.25]$^{\\dagger}$" in tex
    assert "\\footnotesize $^{\\dagger}$ disturbed: the interference probe" in tex
    assert MARK not in tex
    html = (noisy_report / "index.html").read_text()
    assert f">2.05 [1.84–2.25]{MARK}</a>" in html and f'<p class="note">{MARK} disturbed: the interference' in html


def test_summary_marks_only_values_resting_on_a_disturbed_row(tmp_path: Path) -> None:
    """The summary's point is N=4096: a disturbed row there marks its column's value; one at N=2048 marks nothing."""
    sweep(tmp_path / "at", {("linear", 4096, True): NOISY}, QUIET)
    sweep(tmp_path / "off", {("linear", 2048, True): NOISY}, QUIET)
    at = report.write_report(tmp_path / "at").read_text()
    off = report.write_report(tmp_path / "off").read_text()
    summary = [line for line in at.split("## Summary", 1)[1].splitlines() if line.startswith("| ")]
    header = [c.strip() for c in summary[0].strip("|").split("|")]
    linear = dict(zip(header, [c.strip() for c in next(s for s in summary if "| linear |" in s).strip("|").split("|")],
                      strict=True))  # fmt: skip
    marked = sorted(k for k, v in linear.items() if v.endswith(MARK))
    assert marked == ["scaling: latency (ms) ↓ @ fwd causal float16 N=4096 B×H×D=1×8×64"]
    assert MARK not in off.split("## Summary", 1)[1].split("## Provenance", 1)[0]


def test_no_disturbed_row_says_so(tmp_path: Path) -> None:
    sweep(tmp_path / "quiet", probe=QUIET)
    quiet = report.write_report(tmp_path / "quiet").read_text()
    assert "Timing: no timed row was disturbed (12 timed rows; interference probe quiet)." in quiet
    sweep(tmp_path / "old")  # rows written before the probe: no columns at all
    old = report.write_report(tmp_path / "old")
    assert "Timing: no timed row was disturbed as far as the rows say" in old.read_text()
    assert MARK not in old.read_text() and MARK not in quiet
    assert MARK not in (old.parent / "leaderboard.tex").read_text().replace("$^{\\dagger}$", MARK)


# ---------------------------------------------------------------- plots and fits


def rows_of(disturbed: dict | None = None) -> pd.DataFrame:
    out = []
    for kv in LENGTHS:
        for method in ("softmax", "linear"):
            extra = (disturbed or {}).get((method, kv), QUIET)
            out.append(make_row(f"{method}-{kv}", method=method, impl="reference", seq_len=kv, kv_len=kv,
                                latency_ms=1e-3 * kv, peak_mem_bytes=kv * 2**10, **extra))  # fmt: skip
    return prepare(pd.DataFrame(out))


def figure_labels(rows: pd.DataFrame, metric: str) -> tuple[list[str], int]:
    """(the figure's legend labels, how many disturbed-point artists its panels hold)."""
    _, title, drawn = figure_rows(plot_data(rows, metric))[0]
    fig = context_figure(drawn, metric, title)
    labels = [t.get_text() for legend in fig.legends for t in legend.get_texts()]
    hollow = [a for ax in fig.axes for a in ax.get_children() if a.get_gid() == "disturbed"]
    return labels, len(hollow)


def test_timing_plots_draw_disturbed_points_hollow_with_a_legend_entry() -> None:
    rows = rows_of({("linear", 2048): NOISY})
    for metric in ("latency_ms", "pct_peak"):
        labels, hollow = figure_labels(rows, metric)
        assert LABEL in labels and hollow == 1
    labels, hollow = figure_labels(rows, "peak_mem_bytes")  # memory is measured without the clock
    assert LABEL not in labels and hollow == 0
    labels, hollow = figure_labels(rows_of(), "latency_ms")
    assert LABEL not in labels and hollow == 0


def test_pareto_marks_a_point_whose_cost_rests_on_a_disturbed_row() -> None:
    rows = [make_row(f"needle-{m}-{d}", task="needle", method=m, impl="reference", seq_len=2048, kv_len=2048, depth=d,
                     beta=8.0, variant="single", needles=1, distractor_sim=0.75, accuracy=a, hits=int(16 * a),
                     trials=16, latency_ms=lat, **(NOISY if m == "slow" and d == 0.5 else QUIET))
            for m, a, lat in (("fast", 0.5, 1.0), ("slow", 1.0, 3.0)) for d in (0.0, 0.5)]  # fmt: skip
    summaries, _ = summarise(prepare(pd.DataFrame(rows)))
    fig = pareto_figure(next(s for s in summaries if s.columns))
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [LABEL]
    marked = [a for a in ax.get_children() if a.get_gid() == "disturbed"]
    assert len(marked) == 1 and marked[0].get_offsets().tolist() == [[3.0, 1.0]]


def test_fits_through_a_disturbed_row_are_flagged_for_time_not_memory() -> None:
    rows = rows_of({("linear", 2048): NOISY})
    slopes = scaling_slopes(rows)
    assert dict(zip(slopes["method"], slopes["disturbed"], strict=True)) == {"linear": True, "softmax": False}
    eff = efficiency_lengths(rows, ("softmax", "reference"))
    assert dict(zip(eff["metric"], eff["disturbed"], strict=True)) == {"time": True, "memory": False}
    quiet = efficiency_lengths(rows_of(), ("softmax", "reference"))
    assert not quiet["disturbed"].any() and not math.isnan(quiet["slope"].iloc[0])


# ---------------------------------------------------------------- the baseline builder


def test_make_baseline_takes_the_median_quiet_row_of_each_cell(tmp_path: Path) -> None:
    """Per cell the median-latency run, but never a disturbed row when another run has a quiet one."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    import make_baseline

    latencies = {"a": [1.0, 5.0, 2.0], "b": [9.0, 1.0, 3.0]}  # cell b: run 0 (9.0) was disturbed
    runs = []
    for i in range(3):
        run = tmp_path / f"run{i}"
        for cell, values in latencies.items():
            extra = NOISY if (cell, i) == ("b", 0) else QUIET
            write_row(run, make_row(cell, seq_len=128 if cell == "a" else 256,
                                    latency_ms=values[i], **extra))  # fmt: skip
        runs.append(run)
    assert make_baseline.main([str(tmp_path / "base"), *map(str, runs)]) == 0
    assert [p.name for p in (tmp_path / "base").glob("*.parquet")] == [COMPACTED_NAME]  # one compacted file
    base = load(tmp_path / "base").set_index("cell_id")
    assert base.loc["a"].latency_ms == 2.0  # median of 1, 5, 2
    assert base.loc["b"].latency_ms == 3.0 and not base.loc["b"].noisy  # the upper of the quiet 1 and 3, not the flagged 9
