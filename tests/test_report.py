"""The report: leaderboard tables, the Not measured section, plots, and its failure modes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bench import report
from bench.results import CORE_COLUMNS, SCHEMA_VERSION, load, write_row

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REPO = Path(__file__).resolve().parent.parent


def make_row(cell_id: str, **values) -> dict:
    """A runner-like row: every core column present, a compiled scaling fwd cell unless told otherwise."""
    row = dict.fromkeys(CORE_COLUMNS)
    row.update(
        schema_version=SCHEMA_VERSION,
        run_id="run-1",
        cell_id=cell_id,
        method="softmax",
        impl="torch",
        family="softmax",
        task="scaling",
        suite="smoke",
        hardware="h100_sxm",
        device="NVIDIA H100 80GB HBM3",
        dtype="float16",
        batch=1,
        heads=8,
        seq_len=1024,
        kv_len=1024,
        head_dim=64,
        causal=True,
        mode="fwd",
        status="ok",
        reason="",
        latency_ms=1.0,
        latency_ms_p10=0.9,
        latency_ms_p90=1.1,
        latency_samples_ms=[0.9, 1.0, 1.1],
        peak_mem_bytes=64 * 2**20,
        flops=10**9,
        tflops=1.0,
        pct_peak=0.1,
        fidelity_max_abs=1e-3,
        fidelity_rel=2e-4,
        git_commit="0123456789abcdef0123",
        git_dirty=True,
        torch_version="2.13.0",
        triton_version="3.7.1",
        python_version="3.11.9",
        seed=0,
        config_yaml="",
        timestamp="2026-01-01T00:00:00+00:00",
        impl_kind="reference",
        exact=True,
        interpreted=False,
        input_dist="gaussian",
        threads=16,
        repeats=10,
        method_params="{}",
        cell_seconds=1.5,
    )
    row.update(values)
    return row


def write_sweep(results_dir: Path) -> None:
    """Two impls over three context lengths in two patterns, plus an interpreted kernel and failures."""
    for kv in (1024, 2048, 4096):
        for causal in (True, False):
            c = "c" if causal else "n"
            scale = kv / 1024
            write_row(
                results_dir,
                make_row(
                    f"torch-{c}-{kv}",
                    seq_len=kv,
                    kv_len=kv,
                    causal=causal,
                    latency_ms=1.234567 * scale,
                    latency_ms_p10=1.2 * scale,
                    latency_ms_p90=1.3 * scale,
                    peak_mem_bytes=int(100 * scale * 2**20),
                ),
            )
            write_row(
                results_dir,
                make_row(
                    f"flash-{c}-{kv}",
                    method="flash",
                    impl="triton",
                    impl_kind="kernel",
                    seq_len=kv,
                    kv_len=kv,
                    causal=causal,
                    latency_ms=0.5 * scale,
                    latency_ms_p10=0.45 * scale,
                    latency_ms_p90=0.55 * scale,
                    peak_mem_bytes=int(10 * scale * 2**20),
                ),
            )
            write_row(
                results_dir,
                make_row(
                    f"interp-{c}-{kv}",
                    method="flash",
                    impl="triton_interp",
                    impl_kind="kernel",
                    interpreted=True,
                    seq_len=kv,
                    kv_len=kv,
                    causal=causal,
                    latency_ms=777.0 * scale,
                ),
            )
    write_row(
        results_dir,
        make_row(
            "oom-1",
            kv_len=65536,
            seq_len=65536,
            status="oom",
            reason="CUDA out of memory",
            latency_ms=None,
            latency_ms_p10=None,
            latency_ms_p90=None,
            tflops=None,
        ),
    )
    write_row(
        results_dir,
        make_row(
            "unsup-1",
            method="linear",
            impl="fla",
            status="unsupported",
            reason="needs | sm90, got cpu",
            latency_ms=None,
        ),
    )


@pytest.fixture
def results(tmp_path: Path) -> Path:
    write_sweep(tmp_path / "results")
    return tmp_path / "results"


def section(text: str, start: str, end: str | None = None) -> str:
    body = text.split(start, 1)[1]
    return body.split(end, 1)[0] if end else body


def test_writes_leaderboard_and_valid_pngs(results: Path) -> None:
    path = report.write_report(results)
    assert path == results / "report" / "leaderboard.md"
    for name in (report.LATENCY_PNG, report.MEMORY_PNG):
        png = path.parent / name
        data = png.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000
    assert f"![latency_vs_seq_len]({report.LATENCY_PNG})" in path.read_text()


def test_leaderboard_rows_and_numbers(results: Path) -> None:
    text = report.write_report(results).read_text()
    assert "run-1" in text and "h100_sxm" in text and "0123456789ab (dirty)" in text
    assert "ok 18, unsupported 1, oom 1" in text
    results_part = section(text, "## Task: scaling", "## Not measured")
    causal = section(results_part, "### causal self · fwd · float16\n", "###")
    assert "| softmax | torch | 1024 | 1×8×64 | 1.23 [1.2–1.3] |" in causal
    assert "| flash | triton | 4096 | 1×8×64 | 2 [1.8–2.2] |" in causal
    # Sorted by context then latency: flash (faster) before softmax at each kv_len.
    assert causal.index("| flash | triton | 1024") < causal.index("| softmax | torch | 1024")
    assert causal.index("| softmax | torch | 1024") < causal.index("| flash | triton | 2048")
    assert "### non-causal self · fwd · float16" in results_part
    # Constant sweep keys are stated once, not repeated as columns.
    assert "All rows: input_dist=gaussian\n" in causal  # threads is provenance, not a sweep key
    assert "| peak memory (MiB) |" in causal and "| 100 |" in causal
    assert "2.00e-04" in causal and "1.00e-03" in causal


def test_interpreted_rows_get_their_own_table_and_no_plot(results: Path) -> None:
    text = report.write_report(results).read_text()
    compiled = section(text, "### causal self · fwd · float16\n", "###")
    interp = section(text, "### causal self · fwd · float16 — Triton CPU interpreter", "###")
    assert "triton_interp" not in compiled and "777" not in compiled
    assert interp.count("| flash | triton_interp (interp.) |") == 3 and "777" in interp
    assert "| torch |" not in interp
    df = report.prepare(load(results))
    for metric in ("latency_ms", "peak_mem_bytes"):
        data = report.plot_data(df, metric)
        assert not data["interpreted"].any()
        assert set(data["_line"]) == {"softmax/torch", "flash/triton"}
        assert len(data) == 12 and (data["status"] == "ok").all()


def test_not_measured_lists_every_failure_with_reason(results: Path) -> None:
    text = report.write_report(results).read_text()
    missing = section(text, "## Not measured", "## Plots")
    assert "### unsupported (1)" in missing and "### oom (1)" in missing
    assert "| softmax | torch | scaling | causal self fwd float16 B×H×D=1×8×64 q=65536 kv=65536 |" in missing
    assert "CUDA out of memory" in missing
    assert r"needs \| sm90, got cpu" in missing  # a pipe in a reason cannot break the table
    assert "65536" not in section(text, "## Task: scaling", "## Not measured")


def test_corrupt_file_is_reported_not_fatal(results: Path) -> None:
    (results / "garbage.parquet").write_bytes(b"this is not parquet at all")
    text = report.write_report(results).read_text()
    missing = section(text, "## Not measured", "## Plots")
    assert "### unreadable results files (1)" in missing
    assert "| garbage.parquet |" in missing
    assert "unreadable files: 1" in text
    assert "| softmax | torch | 1024 |" in text


def test_task_without_latency_shows_its_own_metrics(tmp_path: Path) -> None:
    no_latency = dict.fromkeys(
        ["latency_ms", "latency_ms_p10", "latency_ms_p90", "tflops", "pct_peak", "peak_mem_bytes"]
    )
    no_latency.update(fidelity_rel=None, fidelity_max_abs=None, task="needle")
    for i, depth in enumerate((0.25, 0.5)):
        for impl, accuracy in (("torch", 0.9), ("chunked", 0.95)):
            write_row(tmp_path, make_row(f"needle-{impl}-{i}", impl=impl, accuracy=accuracy, depth=depth, **no_latency))
    text = report.write_report(tmp_path).read_text()
    table = section(text, "## Task: needle", "## Not measured")
    assert "| depth |" in table and "| accuracy |" in table and "latency" not in table
    # By depth (a key), then most accurate first.
    assert table.index("| 0.25 | 0.95 |") < table.index("| 0.25 | 0.9 |") < table.index("| 0.5 | 0.95 |")
    # No scaling rows: the plots still exist and say there is nothing to draw.
    assert (tmp_path / "report" / report.LATENCY_PNG).read_bytes().startswith(PNG_MAGIC)


def test_several_combos_get_extra_figures(results: Path) -> None:
    for kv in (1024, 2048):
        write_row(results, make_row(f"bf16-{kv}", dtype="bfloat16", seq_len=kv, kv_len=kv))
    path = report.write_report(results)
    extra = sorted(p.name for p in path.parent.glob("latency_vs_seq_len__*.png"))
    assert extra == ["latency_vs_seq_len__scaling_bfloat16.png"]


def test_pattern_labels() -> None:
    import pandas as pd

    df = pd.DataFrame(
        {
            "causal": [True, False, True, None],
            "seq_len": [8, 8, 1, 4],
            "kv_len": [8, 16, 64, 4],
            "mode": ["fwd", "bwd", "decode", "fwd"],
        }
    )
    assert list(report.pattern_labels(df)) == ["causal self", "non-causal cross", "causal self", "self"]


def test_format_numbers() -> None:
    assert report.fmt_num(1.234567) == "1.23"
    assert report.fmt_num(1234.5) == "1234"
    assert report.fmt_num(0.000123) == "1.23e-04"
    assert report.fmt_num(None) == report.MISSING


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
