"""Fault injection: every way a cell or a sweep can fail, what the user sees, and what is kept.

Each test is one line of the README's fault table. In-process failures (exception, NaN, wrong result,
simulated OOM, slow call) are also covered cell by cell in test_runner.py; here the same faults and the
ones only a separate process survives (segfault, abort, kill -9, hang) run through isolated workers.
"""

from __future__ import annotations

import errno
import importlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import bench.results
import bench.run
from bench.isolation import exit_reason
from bench.measure.hardware import HardwareProfile
from bench.measure.provenance import REPO_ROOT
from bench.measure.timing import TimingConfig
from bench.results import ResultsUnwritable, load, read_row, result_files
from bench.sweep import RunSettings, run_cells
from methods import METHODS
from tasks.base import Cell

POINT = dict(dtype="float32", batch=1, heads=2, seq_len=64, kv_len=64, head_dim=16, causal=True, mode="fwd",
             input_dist="gaussian")
PROFILE = HardwareProfile("cpu", "cpu", "test cpu", {"float32": 1.0}, None, None, True, "test")
QUICK = TimingConfig(warmup=0, min_time_s=0.0, min_repeats=2, max_repeats=2, probe=False)


@pytest.fixture
def fault_method():
    """The `fault` method (tests/fault_method.py), registered for one test; workers import it as a plugin."""
    sys.modules.pop("fault_method", None)
    yield importlib.import_module("fault_method")
    METHODS.pop("fault", None)
    sys.modules.pop("fault_method", None)


def fault_cell(fault: str, i: int = 0) -> Cell:
    """Distinct points, so each fault is its own point group (and its own worker job)."""
    n = 64 + i
    return Cell("fault", "reference", "scaling", "cpu", {**POINT, "seq_len": n, "kv_len": n}, {"fault": fault})


def settings(path: Path, **kw) -> RunSettings:
    return RunSettings(path, "run1", torch.device("cpu"), PROFILE, QUICK, measure_memory=False,
                       plugins=("fault_method",), **kw)  # fmt: skip


def test_isolated_faults_become_rows_and_the_sweep_goes_on(tmp_path, fault_method):
    """One sweep meets every fault a cell can have; each becomes its row, and the cells after it still run."""
    faults = ["none", "raise", "nan", "wrong", "oom", "alloc", "segfault", "abort", "kill", "hang", "none"]
    cells = [fault_cell(f, i) for i, f in enumerate(faults)]
    log: list[str] = []
    rows = run_cells(cells, settings(tmp_path, isolate="true", cell_timeout_s=4.0), log=log.append)
    got = {r["cell_id"]: r for r in rows}
    by_fault = dict(zip(faults[:-1], (got[c.cell_id] for c in cells[:-1]), strict=True))
    expected = {
        "none": ("ok", ""),
        "raise": ("error", "RuntimeError: injected failure"),
        "nan": ("wrong", "NaN/Inf"),
        "wrong": ("wrong", "against the fp64 oracle exceeds"),
        "oom": ("oom", "out of memory"),
        "alloc": ("oom", "can't allocate memory"),
        "segfault": ("error", "worker crashed (SIGSEGV: segmentation fault)"),
        "abort": ("error", "worker crashed (SIGABRT: aborted)"),
        "kill": ("error", "worker crashed (SIGKILL: out of memory, or killed from outside)"),
        "hang": ("timeout", "no result after 4 s (cell_timeout_s)"),
    }
    for fault, (status, reason) in expected.items():
        row = by_fault[fault]
        assert row["status"] == status and reason in row["reason"], (fault, row["status"], row["reason"])
        assert row["worker"] == 0 and "\n" not in row["reason"]
    assert got[cells[-1].cell_id]["status"] == "ok"  # the sweep went on after the hang
    on_disk = load(tmp_path)
    assert sorted(on_disk["cell_id"]) == sorted(c.cell_id for c in cells)  # one row per cell, the crashed ones too
    assert on_disk.set_index("cell_id").loc[cells[6].cell_id, "method"] == "fault"  # failure rows keep their keys
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_a_crashed_cell_is_measured_again_by_the_next_run(tmp_path, fault_method, monkeypatch):
    """A failure row is not `ok`: the re-run measures that cell again (its bug fixed, here) and skips the rest."""
    good, bad = fault_cell("none", 0), fault_cell("segfault", 1)
    run_cells([good, bad], settings(tmp_path, isolate="true"), log=lambda s: None)
    assert read_row(tmp_path / f"{bad.cell_id}.parquet")["status"] == "error"
    monkeypatch.setattr(fault_method.FaultReference, "fault", "none", raising=False)
    monkeypatch.setattr(fault_method.FaultReference, "__init__", lambda self, fault: torch.nn.Module.__init__(self))
    log: list[str] = []
    rows = run_cells([good, bad], settings(tmp_path), log=log.append)  # in-process: the fix is this process's
    assert [(r["cell_id"], r["status"]) for r in rows] == [(bad.cell_id, "ok")]
    assert sum("skipped (ok row exists)" in line for line in log) == 1


def test_exit_reasons_name_the_signal_and_the_oom_killer():
    assert exit_reason(-signal.SIGKILL, True, []) == (
        "oom", "worker killed by the kernel's OOM killer (SIGKILL) while measuring this cell")
    assert exit_reason(-signal.SIGKILL, False, [])[0] == "error"
    assert exit_reason(3, False, ["Traceback ...", "ImportError: no module named x", ""]) == (
        "error", "worker exited with code 3 while measuring this cell: ImportError: no module named x")


def test_a_full_disk_stops_the_sweep_on_one_line_and_keeps_the_rows_written(tmp_path, fault_method, monkeypatch):
    """Simulated ENOSPC from the third write on: the two rows before it are intact, no temp file is left."""
    real, calls = bench.results.write_row, []

    def filling(results_dir, row):
        calls.append(row["cell_id"])
        if len(calls) > 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(results_dir, row)

    monkeypatch.setattr(bench.results, "write_row", filling)
    cells = [fault_cell("none", i) for i in range(4)]
    with pytest.raises(ResultsUnwritable) as err:
        run_cells(cells, settings(tmp_path), log=lambda s: None)
    message = str(err.value)
    assert "No space left on device" in message and "run the same command again" in message and "\n" not in message
    assert sorted(load(tmp_path)["cell_id"]) == sorted(calls[:2])
    assert [p.name for p in tmp_path.iterdir()] == [p.name for p in result_files(tmp_path)]  # nothing half-written


def test_a_worker_that_cannot_write_stops_the_sweep(tmp_path, fault_method, monkeypatch):
    """The same through a worker: it says so, the sweep stops with the one line, the worker is gone."""
    monkeypatch.setenv(fault_method.FULL_DISK_ENV, "1")  # read by the worker's import of the plugin
    with pytest.raises(ResultsUnwritable, match=r"^cannot write results to .*No space left on device"):
        run_cells([fault_cell("none")], settings(tmp_path, isolate="true"), log=lambda s: None)
    assert result_files(tmp_path) == []


def test_a_read_only_results_folder_fails_before_any_cell_runs(tmp_path, monkeypatch):
    """Simulated (the tests may run as root, who writes anywhere): the folder refuses the first file."""

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr("bench.measure.files.tempfile.mkstemp", refuse)
    with pytest.raises(ResultsUnwritable, match=r"^cannot write results to .*: Permission denied$"):
        bench.run.open_results(tmp_path / "run")


def test_a_corrupt_row_file_is_reported_skipped_and_measured_again(tmp_path, fault_method):
    cells = [fault_cell("none", i) for i in range(3)]
    run_cells(cells, settings(tmp_path), log=lambda s: None)
    broken = tmp_path / f"{cells[1].cell_id}.parquet"
    broken.write_bytes(b"PAR1 this is not a parquet file")
    with pytest.warns(UserWarning, match=r"^corrupt results file .*\.parquet: "):
        assert len(load(tmp_path, on_corrupt="warn")) == 2
    rows = run_cells(cells, settings(tmp_path), log=lambda s: None)
    assert [r["cell_id"] for r in rows] == [cells[1].cell_id]
    assert read_row(broken)["status"] == "ok"


def run_cli(*args: str, **popen) -> subprocess.Popen:
    env = {**os.environ, "ATTNBENCH_RUN_ID": "kill-test", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "bench.run", *args], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)  # fmt: skip


def test_kill_9_of_the_sweep_then_the_same_command_runs_only_the_missing_cells(tmp_path):
    args = ("suite=smoke", "task=scaling", "method=softmax", "impl=[reference,sdpa]", "+timing.probe=false",
            f"results_dir={tmp_path}", "report=false", "measure_memory=false")  # fmt: skip
    proc = run_cli(*args, start_new_session=True)
    deadline = time.monotonic() + 120
    while len(result_files(tmp_path)) < 4 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[0]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    before = load(tmp_path).set_index("cell_id")["timestamp"]
    assert 4 <= len(before) < 20, "the sweep ended before it could be killed"
    assert (tmp_path / bench.run.UNFINISHED).exists()
    again = run_cli(*args)
    out, _ = again.communicate(timeout=300)
    assert again.returncode == 0, out
    assert out.count("skipped (ok row exists)") == len(before)
    rows = load(tmp_path)
    assert len(rows) == 20 and rows["cell_id"].is_unique and (rows["status"] == "ok").all()
    assert rows.set_index("cell_id").loc[before.index, "timestamp"].equals(before)  # rows before the kill: untouched
    assert not (tmp_path / bench.run.UNFINISHED).exists()
    assert [p.name for p in result_files(tmp_path)] == ["_compacted.parquet"]  # the finished run, in one file


def test_make_bench_resumes_the_unfinished_run_of_the_same_command(tmp_path, monkeypatch):
    runs = tmp_path / "results" / "runs"
    (runs / "20260101-000000").mkdir(parents=True)
    (runs / "20260101-000000" / bench.run.UNFINISHED).write_text(json.dumps({"argv": ["suite=cpu"]}))
    (tmp_path / "results" / "latest").symlink_to(Path("runs") / "20260101-000000")
    monkeypatch.setattr(bench.run, "REPO_ROOT", tmp_path)
    assert bench.run.unfinished_run(["suite=cpu"]) == "20260101-000000"
    assert bench.run.unfinished_run(["suite=smoke"]) is None  # another command starts a new run
    (runs / "20260101-000000" / bench.run.UNFINISHED).unlink()
    assert bench.run.unfinished_run(["suite=cpu"]) is None  # a finished run is never reopened
