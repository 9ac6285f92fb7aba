"""The device check's script and summary (scripts/gpu_check.sh, scripts/gpu_summary.py) on a CPU.

They run for real only on the rare day a GPU is lent, so what can be held here is: the script parses and refuses
bad input on one line, and the summary's numbers are the rows' (speed-up = reference latency / kernel latency,
kernel vs SDPA = SDPA latency / kernel latency, counts per status). `.ci/run` also runs the whole script with
`--dry-run`.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from helpers import make_row

from bench.results import load, write_row

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
SUMMARY = ROOT / "scripts" / "gpu_summary.py"


def load_summary():
    spec = importlib.util.spec_from_file_location("gpu_summary", SUMMARY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def scaling_row(method: str, impl: str, n: int, causal: bool, latency: float, mode: str = "fwd", **values) -> dict:
    """A bf16 row whose TFLOP/s (10 / latency) and % of peak (1 / latency) follow from its latency, as measured."""
    cell_id = f"{method}-{impl}-{n}-{causal}-{mode}"
    speed = {"tflops": 10.0 / latency, "pct_peak": 1.0 / latency} if latency else {"tflops": None, "pct_peak": None}
    return make_row(cell_id, method=method, impl=impl, seq_len=n, kv_len=n, causal=causal, mode=mode, dtype="bfloat16",
                    latency_ms=latency, **speed, **values)  # fmt: skip


@pytest.fixture
def results(tmp_path):
    rows = [
        scaling_row("softmax", "kernel", 4096, True, 2.0),
        scaling_row("softmax", "sdpa", 4096, True, 1.0),
        scaling_row("softmax", "flex", 4096, True, 1.6),
        scaling_row("softmax", "reference", 4096, True, 8.0),
        scaling_row("softmax", "kernel", 4096, True, None, mode="fwd_bwd", status="unsupported", reason="no backward"),
        scaling_row("softmax", "sdpa", 4096, True, 3.0, mode="fwd_bwd"),
        scaling_row("sliding_window", "kernel", 4096, False, 0.5),
        scaling_row("sliding_window", "reference", 4096, False, 1.5),
        scaling_row("sliding_window", "kernel", 16384, False, 1.0),
        scaling_row("sliding_window", "reference", 16384, False, 8.0),
        scaling_row("linear", "kernel", 4096, True, None, status="error", reason="RuntimeError: boom"),
        scaling_row("linear", "reference", 4096, True, 4.0),
    ]
    for row in rows:
        write_row(tmp_path, row)
    return tmp_path


def test_summary_numbers_are_the_rows(results):
    summary = load_summary()
    df = load(results)
    table = summary.softmax_table(df).set_index(["seq_len", "causal", "mode"])
    fwd = table.loc[(4096, True, "fwd")]
    assert fwd["kernel_tflops"] == pytest.approx(5.0) and fwd["sdpa_tflops"] == pytest.approx(10.0)
    assert fwd["flex_pct"] == pytest.approx(1 / 1.6)
    assert fwd["kernel_vs_sdpa"] == pytest.approx(0.5)  # SDPA latency / kernel latency
    assert pd.isna(table.loc[(4096, True, "fwd_bwd")]["kernel_tflops"])  # the unsupported kernel row is not timed

    ups = summary.speedups(df).set_index(["method", "seq_len"])["speedup"]
    assert ups.to_dict() == pytest.approx({("softmax", 4096): 4.0, ("sliding_window", 4096): 3.0,
                                           ("sliding_window", 16384): 8.0})  # fmt: skip
    assert ("linear", 4096) not in ups.index  # its kernel row failed: nothing to compare

    assert summary.status_counts(df) == {"error": 1, "ok": 10, "unsupported": 1}


def test_summary_cli_prints_and_saves_one_screen(results, tmp_path):
    out = tmp_path / "summary.txt"
    proc = subprocess.run([sys.executable, str(SUMMARY), str(results), "--out", str(out)],
                          capture_output=True, text=True, check=True)  # fmt: skip
    assert out.read_text() == proc.stdout
    text = proc.stdout
    assert "0.50x" in text and "8.00x" in text and "3.00x" in text
    assert "rows: 12; 1 error, 10 ok, 1 unsupported" in text
    assert "error: linear/kernel N=4096 causal=True fwd: RuntimeError: boom" in text
    assert len(text.splitlines()) <= 40  # one screen


def test_summary_of_an_empty_folder_is_a_one_line_error(tmp_path):
    proc = subprocess.run([sys.executable, str(SUMMARY), str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: no rows under {tmp_path}"


def test_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_script_refuses_bad_arguments_and_missing_wheels_on_one_line(tmp_path):
    proc = subprocess.run(["bash", str(SCRIPT), "--frobnicate"], capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown argument '--frobnicate'" in proc.stderr
    proc = subprocess.run(["bash", str(SCRIPT), "--budget-s", "soon"], capture_output=True, text=True)
    assert proc.returncode == 2 and "--budget-s takes whole seconds" in proc.stderr
    # A copy of the script in a tree without gpu-wheels/: it says how to make them and stops before any work.
    (tmp_path / "scripts").mkdir()
    shutil.copy(SCRIPT, tmp_path / "scripts" / SCRIPT.name)
    proc = subprocess.run(["bash", str(tmp_path / "scripts" / SCRIPT.name)], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "make gpu-wheels" in proc.stderr


def test_summary_without_a_peak_for_the_dtype_leaves_pct_empty(tmp_path):
    """A CPU without fast bf16 skips measuring its peak, so no row has pct_peak: the table still renders."""
    for impl, latency in (("kernel", 2.0), ("sdpa", 1.0)):
        write_row(tmp_path, {**scaling_row("softmax", impl, 128, False, latency), "pct_peak": None})
    summary = load_summary()
    table = summary.softmax_table(load(tmp_path)).set_index(["seq_len", "causal", "mode"])
    row = table.loc[(128, False, "fwd")]
    assert row["kernel_tflops"] == pytest.approx(5.0) and pd.isna(row["kernel_pct"]) and pd.isna(row["sdpa_pct"])
    assert "kernel vs sdpa" in summary.render(load(tmp_path))
