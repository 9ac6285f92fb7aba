"""The report: the ranked summary first, per-cell tables from declared keys and metrics, Not measured, plots.

Rows are built as the runner writes them (`declared`: keys named, metrics
declared, schema 2), except where a test checks the fallback for schema-1 rows,
which carry neither and get their task's registered declaration.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import make_row

import tasks
from bench import report
from bench.report.format import MISSING, fmt_metric, fmt_num, metric_header
from bench.report.plots import plot_data
from bench.report.rows import pattern_labels, prepare, row_keys, row_metrics
from bench.report.summary import rank
from bench.report.tables import cell_table
from bench.results import load, write_row
from bench.sweep import metric_declarations
from tasks.base import SHAPE_KEYS, Metric, Task

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REPO = Path(__file__).resolve().parent.parent


def declared(row: dict) -> dict:
    """The row as the runner writes it since schema 2: its key columns named, its task's metrics declared."""
    task = tasks.get_task(row["task"])
    keys = [*SHAPE_KEYS, *(k for k in task.keys if row.get(k) is not None), "method_params"]
    return {**row, "keys": keys, "metrics": metric_declarations(task)}


def write(results: Path, cell_id: str, **values) -> None:
    write_row(results, declared(make_row(cell_id, **values)))


def write_sweep(results_dir: Path) -> None:
    """Two impls over three context lengths in two patterns, plus an interpreted kernel and failures."""
    for kv in (1024, 2048, 4096):
        for causal in (True, False):
            c = "c" if causal else "n"
            s = kv / 1024
            shape = dict(seq_len=kv, kv_len=kv, causal=causal)
            write(results_dir, f"torch-{c}-{kv}", latency_ms=1.234567 * s, latency_ms_p10=1.2 * s,
                  latency_ms_p90=1.3 * s, peak_mem_bytes=int(100 * s * 2**20), **shape)  # fmt: skip
            write(results_dir, f"flash-{c}-{kv}", method="flash", impl="triton", impl_kind="kernel",
                  latency_ms=0.5 * s, latency_ms_p10=0.45 * s, latency_ms_p90=0.55 * s,
                  peak_mem_bytes=int(10 * s * 2**20), **shape)  # fmt: skip
            write(results_dir, f"interp-{c}-{kv}", method="flash", impl="triton_interp", impl_kind="kernel",
                  interpreted=True, latency_ms=777.0 * s, **shape)  # fmt: skip
    write(results_dir, "oom-1", kv_len=65536, seq_len=65536, status="oom", reason="CUDA out of memory",
          latency_ms=None, latency_ms_p10=None, latency_ms_p90=None, tflops=None)  # fmt: skip
    write(results_dir, "unsup-1", method="linear", impl="fla", status="unsupported", reason="needs | sm90, got cpu",
          latency_ms=None)  # fmt: skip


@pytest.fixture
def results(tmp_path: Path) -> Path:
    write_sweep(tmp_path / "results")
    return tmp_path / "results"


def section(text: str, start: str, end: str | None = None) -> str:
    body = text.split(start, 1)[1]
    return body.split(end, 1)[0] if end else body


def md_tables(text: str) -> list[list[str]]:
    """Every Markdown table of a document as its lines, in order."""
    tables, current = [], []
    for line in text.splitlines():
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append(current)
            current = []
    return tables + ([current] if current else [])


def cells(line: str) -> list[str]:
    return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]


# ---------------------------------------------------------------- the summary


def write_three_methods(results: Path) -> None:
    """`best` wins every column (latency, memory, fidelity, hit rate), `mid` is second everywhere, `worst` last."""
    for method, factor, hits in (("worst", 4.0, 2), ("best", 1.0, 16), ("mid", 2.0, 8)):
        for kv in (1024, 2048):
            for causal in (False, True):
                write(results, f"{method}-{kv}-{causal}", method=method, impl="reference", seq_len=kv, kv_len=kv,
                      causal=causal, latency_ms=factor * kv / 1024, peak_mem_bytes=int(factor * 2**20),
                      fidelity_rel=factor * 1e-4)  # fmt: skip
        write(results, f"{method}-needle", method=method, impl="reference", task="needle", seq_len=2048,
              kv_len=2048, depth=0.5, beta=8.0, variant="single", needles=1, distractor_sim=0.75, accuracy=hits / 16,
              hits=hits, trials=16)  # fmt: skip
    # Fastest of all, but a CPU-interpreter run: never in the summary.
    write(results, "interp", method="fast", impl="triton_interp", interpreted=True, latency_ms=1e-6, seq_len=2048,
          kv_len=2048, causal=False)  # fmt: skip


def test_summary_is_the_first_table_everywhere_and_ranked(tmp_path: Path) -> None:
    write_three_methods(tmp_path)
    md = report.write_report(tmp_path).read_text()
    first = md_tables(md)[0]
    assert md.index("## Summary") < md.index("## Provenance") < md.index("## Task: needle")
    header = cells(first[0])
    assert header[:3] == ["#", "method", "impl"] and header[-1] == "mean rank"
    ranked = [cells(line)[1] for line in first[2:]]
    assert ranked == ["best", "mid", "worst"]  # better on every column ranks first
    assert [cells(line)[-1] for line in first[2:]] == ["1.00", "2.00", "3.00"]
    assert "fast" not in "\n".join(first)  # interpreted rows are left out, and the report says so
    assert "Interpreted-kernel rows (Triton CPU interpreter, 1 ok rows) are excluded" in md
    assert "Ranked by mean rank" in md
    out = tmp_path / "report"
    page = (out / "index.html").read_text()
    assert page.index("<table") == page.index('<table id="summary" class="sortable">')
    tex = (out / "leaderboard.tex").read_text()
    assert tex.split(r"\caption{", 1)[1].startswith("Summary")


def test_summary_headers_say_metric_point_and_direction(tmp_path: Path) -> None:
    write_three_methods(tmp_path)
    header = cells(md_tables(report.write_report(tmp_path).read_text())[0][0])
    point = "fwd float16 N=2048 B×H×D=1×8×64"  # the reference point: the longest forward context all impls share
    assert "scaling: latency (ms) ↓ @ fwd non-causal float16 N=2048 B×H×D=1×8×64" in header
    assert "scaling: latency (ms) ↓ @ fwd causal float16 N=2048 B×H×D=1×8×64" in header
    assert f"scaling: peak memory (MiB) ↓ @ {point}" in header
    assert f"scaling: fidelity (rel. error vs fp64) ↓ @ {point}" in header
    assert "needle: hit rate ↑ @ 2048 tokens, single needle, mean over depths" in header


def test_one_summary_per_hardware_profile(tmp_path: Path) -> None:
    for hw, latency in (("a100", 2.0), ("h100", 1.0)):
        for method in ("m1", "m2"):
            write(tmp_path, f"{hw}-{method}", hardware=hw, method=method, latency_ms=latency * int(method[1]))
    summary = section(report.write_report(tmp_path).read_text(), "## Summary", "## Provenance")
    tables = md_tables(summary)
    assert len(tables) == 2 and summary.index("Hardware profile a100") < summary.index("Hardware profile h100")
    assert [cells(t[2])[3] for t in tables] == ["2", "1"]  # m1's latency on each profile, never mixed


def test_rank_follows_each_metric_direction() -> None:
    values = pd.DataFrame(
        {0: [3.0, 1.0, 2.0, None], 1: [0.2, 0.9, 0.5, 0.95]},  # latency (lower better), accuracy (higher better)
        index=pd.MultiIndex.from_tuples([("c", "x"), ("a", "x"), ("b", "x"), ("d", "x")], names=["method", "impl"]),
    )
    ranked = rank(values, ["lower", "higher"])
    # a: ranks 1 and 2; b: 2 and 3; c: 3 and 4; d has no latency, so only its accuracy rank (1) counts.
    assert [m for m, _ in ranked.index] == ["d", "a", "b", "c"]
    assert ranked["mean_rank"].tolist() == [1.0, 1.5, 2.5, 3.5] and ranked["n_ranked"].tolist() == [1, 2, 2, 2]
    # Ties share the best rank; a column without a direction is shown, never ranked.
    tied = rank(pd.DataFrame({0: [1.0, 1.0], 1: [5.0, 1.0]}, index=values.index[:2]), ["lower", None])
    assert tied["mean_rank"].tolist() == [1.0, 1.0] and tied.index[0] == ("a", "x")  # tie: by name


@pytest.fixture
def toy_task():
    """A task the package does not ship, registered at run time, with its own lower-is-better metric."""

    class ToyTask(Task):
        name = "toy_reader_test"
        keys = ("knob",)
        metrics = (Metric("wall_s", "s", "lower", None, "wall time"), Metric("note_count", "", None, None, "notes"))
        headline = "wall_s"

        def run_cell(self, cell, make_attention, ctx):  # never run: the report only reads its rows
            raise AssertionError("not run in this test")

    tasks.register_task(ToyTask)
    yield ToyTask
    del tasks.TASKS[ToyTask.name]


def test_toy_task_gets_its_column_and_direction(tmp_path: Path, toy_task: type[Task]) -> None:
    for method, wall in (("slowpoke", 9.0), ("quick", 1.0), ("middling", 4.0)):
        for knob in (1, 2):
            write(tmp_path, f"toy-{method}-{knob}", method=method, task=toy_task.name, knob=knob, wall_s=wall * knob,
                  note_count=7, latency_ms=None)  # fmt: skip
    md = report.write_report(tmp_path).read_text()
    summary = md_tables(md)[0]
    assert "toy_reader_test: wall time (s) ↓ @ mean over cells" in cells(summary[0])
    assert [cells(line)[1] for line in summary[2:]] == ["quick", "middling", "slowpoke"]  # lower is better
    table = section(md, "## Task: toy_reader_test", "## Not measured")
    assert "| method | impl | point | wall time (s) ↓ |" in table  # declared metric, declared key; notes: no direction
    rows = [cells(line) for line in md_tables(table)[0][2:]]
    assert [(r[0], r[2]) for r in rows[:3]] == [("quick", "knob=1"), ("middling", "knob=1"), ("slowpoke", "knob=1")]


def test_unregistered_task_reports_from_its_rows_alone(tmp_path: Path) -> None:
    """Rows of a task this code does not know: keys and metrics (and the headline) come from the rows."""
    metrics = json.dumps([{"name": "score", "unit": "", "better": "higher", "judge": None, "label": "score",
                           "headline": True}])  # fmt: skip
    for method, score in (("lo", 0.2), ("hi", 0.9)):
        write_row(tmp_path, make_row(f"u-{method}", method=method, task="gone_task", knob=3, score=score,
                                     keys=["seq_len", "knob"], metrics=metrics))  # fmt: skip
    md = report.write_report(tmp_path).read_text()
    summary = md_tables(md)[0]
    assert "gone_task: score ↑ @ mean over cells" in cells(summary[0])
    assert [cells(line)[1] for line in summary[2:]] == ["hi", "lo"]
    assert "All rows: N=1024, knob=3" in section(md, "## Task: gone_task")


# ---------------------------------------------------------------- keys and metrics come from declarations


def needle_like_rows() -> list[dict]:
    """Rows with the needle task's many descriptive columns; they must never be taken for keys."""
    rows = []
    for depth in (0.0, 1.0):
        for impl, hits in (("a", 16), ("b", 4)):
            rows.append(make_row(f"n-{impl}-{depth}", impl=impl, task="needle", depth=depth, beta=8.0,
                                 variant="single", needles=1, distractor_sim=0.75, accuracy=hits / 16, hits=hits,
                                 trials=16, margin=0.3, margin_min=-0.1, chance=1 / 64, linear_in_v=True,
                                 needle_pos=3, n_queries=1, method_mass=0.5))  # fmt: skip
    return rows


@pytest.mark.parametrize("schema", [2, 1])
def test_metrics_never_become_keys(tmp_path: Path, schema: int) -> None:
    rows = needle_like_rows()
    rows = [declared(r) for r in rows] if schema == 2 else rows  # schema 1: the registry's declaration
    frame = prepare(pd.DataFrame(rows))
    keys = row_keys(frame)
    assert {"depth", "beta", "variant", "seq_len", "method_params"} <= set(keys)
    assert not {"hits", "trials", "margin", "margin_min", "chance", "linear_in_v", "needle_pos", "accuracy"} & set(keys)
    table = cell_table(frame)
    text = table.caption + " " + " ".join(table.cells.get("point", pd.Series(dtype=str)))
    for name in ("hits", "trials", "margin", "chance", "linear_in_v", "needle_pos", "n_queries"):
        assert name not in text
    assert list(table.cells.columns[:4]) == ["method", "impl", "point", "hit rate ↑"]  # the headline first
    assert table.cells["point"].tolist() == ["depth=0", "depth=0", "depth=1", "depth=1"]
    assert table.cells["impl"].tolist() == ["a", "b", "a", "b"]  # best hit rate first at each point
    assert table.caption.startswith("All rows: B×H×D=1×8×64, N=1024, beta=8, variant=single")


def test_a_shape_unit_varies_as_a_whole() -> None:
    """Decode rows share seq_len=1 but not kv_len: the context is in the point column, never in the caption."""
    rows = [make_row(f"d{kv}", mode="decode", seq_len=1, kv_len=kv, batch=b) for kv in (1024, 4096) for b in (1, 2)]
    table = cell_table(prepare(pd.DataFrame(rows)))
    assert "N=" not in table.caption and "B×H×D" not in table.caption
    assert sorted(set(table.cells["point"])) == ["B×H×D=1×8×64 · N=1024", "B×H×D=1×8×64 · N=4096",
                                                 "B×H×D=2×8×64 · N=1024", "B×H×D=2×8×64 · N=4096"]  # fmt: skip


def test_declared_metric_directions_and_headline() -> None:
    metrics, headline = row_metrics(pd.DataFrame([declared(r) for r in needle_like_rows()]))
    by_name = {m.name: m for m in metrics}
    assert headline == "accuracy" and by_name["accuracy"].better == "higher"
    assert by_name["latency_ms"].better == "lower" and by_name["chance"].better is None


def test_schema_1_rows_still_report(tmp_path: Path) -> None:
    """Old results (no keys, no metrics columns, schema 1) get their task's registered declaration."""
    for i, (method, latency) in enumerate((("slow", 3.0), ("fast", 1.0))):
        row = make_row(f"old-{i}", method=method, latency_ms=latency, schema_version=1, input_dist="peaked")
        row = {k: v for k, v in row.items() if k not in ("keys", "metrics")}
        table = pa.Table.from_pylist([{**row, "latency_samples_ms": [latency]}])
        pq.write_table(table, tmp_path / f"old-{i}.parquet")
    md = report.write_report(tmp_path).read_text()
    summary = md_tables(md)[0]
    assert [cells(line)[1] for line in summary[2:]] == ["fast", "slow"]
    assert "All rows: B×H×D=1×8×64, N=1024, input_dist=peaked" in section(md, "## Task: scaling")


def test_no_task_named_in_the_report_source() -> None:
    pattern = re.compile(r"[\"'](needle|mqar|scaling|listops|pathfinder|lra[a-z_]*|lm|lm_swap|perplexity)[\"']")
    found = [f"{p.name}:{i}" for p in sorted((REPO / "bench" / "report").glob("*.py"))
             for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]  # fmt: skip
    assert found == []


# ---------------------------------------------------------------- per-cell tables


def test_writes_leaderboard_and_valid_pngs(results: Path) -> None:
    path = report.write_report(results)
    assert path == results / "report" / "leaderboard.md"
    for name in (report.LATENCY_PNG, report.MEMORY_PNG):
        data = (path.parent / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000
    assert f"![latency_vs_seq_len]({report.LATENCY_PNG})" in path.read_text()


def test_leaderboard_rows_and_numbers(results: Path) -> None:
    text = report.write_report(results).read_text()
    assert "`run-1`" in text and "`h100_sxm`" in text and "`0123456789ab (dirty)`" in text
    assert "ok 18, unsupported 1, oom 1" in text
    results_part = section(text, "## Task: scaling", "## Not measured")
    causal = section(results_part, "### causal self · fwd · float16\n", "###")
    assert "| method | impl | point | latency (ms) ↓ | fidelity (rel. error vs fp64) ↓ |" in causal
    assert "| softmax | torch | N=1024 | 1.23 [1.2–1.3] | 2.00e-04 |" in causal
    assert "| flash | triton | N=4096 | 2 [1.8–2.2] |" in causal
    # By context, then the headline (latency) best first: flash before softmax at each kv_len.
    assert causal.index("| flash | triton | N=1024") < causal.index("| softmax | torch | N=1024")
    assert causal.index("| softmax | torch | N=1024") < causal.index("| flash | triton | N=2048")
    assert "### non-causal self · fwd · float16" in results_part
    # Constant keys are stated once, not repeated as columns; provenance (threads) is not a key.
    assert "All rows: B×H×D=1×8×64, input_dist=gaussian; best latency first at each point" in causal
    assert "threads" not in causal
    assert "peak memory (MiB) ↓" in causal and "| 100 |" in causal
    assert causal.rstrip().endswith("| 0.001 |")  # max abs error, the last column


def test_interpreted_rows_get_their_own_table_and_no_plot(results: Path) -> None:
    text = report.write_report(results).read_text()
    compiled = section(text, "### causal self · fwd · float16\n", "###")
    interp = section(text, "### causal self · fwd · float16 — Triton CPU interpreter", "###")
    assert "triton_interp" not in compiled and "777" not in compiled
    assert interp.count("| flash | triton_interp |") == 3 and "777" in interp
    assert "| torch |" not in interp
    df = prepare(load(results))
    for metric in ("latency_ms", "peak_mem_bytes"):
        data = plot_data(df, metric)
        assert not data["interpreted"].any()
        assert set(data["_line"]) == {"softmax/torch", "flash/triton"}
        assert len(data) == 12 and (data["status"] == "ok").all()


def test_only_tasks_drawn_against_context_are_plotted(results: Path) -> None:
    write(results, "needle-1", task="needle", depth=0.5, beta=8.0, variant="single", accuracy=1.0, latency_ms=0.1)
    df = prepare(load(results))
    assert set(plot_data(df, "latency_ms")["task"]) == {"scaling"}  # needle does not declare plots_vs_context


def test_not_measured_lists_every_failure_with_reason(results: Path) -> None:
    text = report.write_report(results).read_text()
    missing = section(text, "## Not measured", "## Plots")
    assert "unsupported (1)" in missing and "oom (1)" in missing
    assert (
        "| softmax | torch | scaling | causal self fwd float16 B×H×D=1×8×64 N=65536 | CUDA out of memory |" in missing
    )
    assert r"needs \| sm90, got cpu" in missing  # a pipe in a reason cannot break the table
    assert "65536" not in section(text, "## Task: scaling", "## Not measured")


def test_corrupt_file_is_reported_not_fatal(results: Path) -> None:
    (results / "garbage.parquet").write_bytes(b"this is not parquet at all")
    text = report.write_report(results).read_text()
    missing = section(text, "## Not measured", "## Plots")
    assert "unreadable results files (1)" in missing and "| garbage.parquet |" in missing
    assert "unreadable files: 1" in text
    assert "| softmax | torch | N=1024 |" in text


def test_task_without_latency_shows_its_own_metrics(tmp_path: Path) -> None:
    no_latency = dict.fromkeys(
        ["latency_ms", "latency_ms_p10", "latency_ms_p90", "tflops", "pct_peak", "peak_mem_bytes"]
    )
    no_latency.update(fidelity_rel=None, fidelity_max_abs=None, task="needle", beta=8.0, variant="single")
    for i, depth in enumerate((0.25, 0.5)):
        for impl, accuracy in (("torch", 0.9), ("chunked", 0.95)):
            write(tmp_path, f"needle-{impl}-{i}", impl=impl, accuracy=accuracy, depth=depth, **no_latency)
    text = report.write_report(tmp_path).read_text()
    table = section(text, "## Task: needle", "## Not measured")
    assert "| point | hit rate ↑ |" in table and "latency" not in table
    # By depth (a key), then most accurate first.
    assert (
        table.index("| depth=0.25 | 0.95 |") < table.index("| depth=0.25 | 0.9 |") < table.index("| depth=0.5 | 0.95 |")
    )
    # The task's summary needs hits and trials, which these rows lack: said in the summary, not a crash.
    assert "needle: no summary column (KeyError: 'hits')" in section(text, "## Summary", "## Provenance")
    # No rows drawn against context: the plots still exist and say there is nothing to draw.
    assert (tmp_path / "report" / report.LATENCY_PNG).read_bytes().startswith(PNG_MAGIC)


def test_several_parameter_sets_of_one_method_show_only_what_differs(tmp_path: Path) -> None:
    for window in (64, 256):
        write(tmp_path, f"w{window}", method="sliding_window", impl="reference",
              method_params=json.dumps({"window": window, "block": 32}), latency_ms=window / 64)  # fmt: skip
    write(tmp_path, "s", impl="sdpa", method_params=json.dumps({"scale": None}), latency_ms=0.5)
    table = section(report.write_report(tmp_path).read_text(), "## Task: scaling", "## Not measured")
    assert "| sliding_window | reference | window=64 |" in table and "| softmax | sdpa |  |" in table
    assert "block=" not in table and "scale=" not in table


def test_several_combos_get_extra_figures(results: Path) -> None:
    for kv in (1024, 2048):
        write(results, f"bf16-{kv}", dtype="bfloat16", seq_len=kv, kv_len=kv)
    path = report.write_report(results)
    extra = sorted(p.name for p in path.parent.glob("latency_vs_seq_len__*.png"))
    assert extra == ["latency_vs_seq_len__scaling_bfloat16.png"]


def test_pattern_labels() -> None:
    df = pd.DataFrame(
        {
            "causal": [True, False, True, None],
            "seq_len": [8, 8, 1, 4],
            "kv_len": [8, 16, 64, 4],
            "mode": ["fwd", "bwd", "decode", "fwd"],
        }
    )
    assert list(pattern_labels(df)) == ["causal self", "non-causal cross", "causal self", "self"]


def test_format_numbers_and_units() -> None:
    assert fmt_num(1.234567) == "1.23" and fmt_num(1234.5) == "1234" and fmt_num(0.000123) == "1.23e-04"
    assert fmt_num(None) == MISSING
    state = Metric("state_bytes", "bytes", "lower", None, "decode state")
    small, large = pd.Series([1000.0, 2048.0]), pd.Series([3 * 2**30, 5 * 2**30])
    assert metric_header(state, small) == "decode state (KiB) ↓" and fmt_metric(small, state).tolist() == ["0.977", "2"]
    assert metric_header(state, large) == "decode state (GiB) ↓" and fmt_metric(large, state).tolist() == ["3", "5"]
    assert metric_header(Metric("tflops", "TFLOP/s", "higher", None, "TFLOP/s")) == "TFLOP/s ↑"  # unit said once


def test_empty_or_missing_dir_is_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit, match="no result rows under"):
        report.write_report(tmp_path)
    with pytest.raises(SystemExit, match="does not exist"):
        report.write_report(tmp_path / "nope")
    assert report.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: no result rows under")


def test_cli(results: Path, tmp_path: Path) -> None:
    out = tmp_path / "elsewhere"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.report", str(results), "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert (out / "leaderboard.md").exists() and (out / report.MEMORY_PNG).exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "bench.report", str(empty)], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0
