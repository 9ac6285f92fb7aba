"""The command line end to end, as a user runs it (subprocesses, so Hydra is exercised for real)."""

import os
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir

import bench.run  # noqa: F401 - registers the run_id resolver
from bench.measure.provenance import REPO_ROOT
from bench.plan import CONF_DIR, plan_cells
from bench.results import load
from bench.run import validate_cli
from methods import UnknownName


def run(*args, env=None):
    full_env = {**os.environ, "ATTNBENCH_RUN_ID": "test-run", **(env or {})}
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO_ROOT, capture_output=True, text=True, env=full_env,
                          timeout=600)


UNKNOWN_NAMES = [
    (["method=sofmax"], "unknown method 'sofmax'; choose from: "),
    (["method=softmax", "impl=fastest"], "unknown impl of softmax 'fastest'; choose from: flash_attn, flex"),
    (["task=haystack"], "unknown task 'haystack'; choose from:"),
    (["hardware=tpu_v5"], "unknown hardware 'tpu_v5'; choose from: a100_80gb"),
    (["suite=huge"], "unknown suite 'huge'; choose from: auto, cpu"),
    (["-m", "method=softmax,nope"], "unknown method 'nope'"),
]


@pytest.mark.parametrize("args,expected", UNKNOWN_NAMES)
def test_unknown_names_are_rejected_with_the_choices(args, expected):
    """Checked before Hydra composes anything; the valid names listed (softmax is always among the methods)."""
    with pytest.raises(UnknownName) as err:
        validate_cli(args)
    assert expected in str(err.value) and "\n" not in str(err.value)
    if args == ["method=sofmax"]:
        assert "softmax" in str(err.value).split("choose from:")[1]


def test_an_unknown_name_fails_at_once_on_one_line():
    """The command line as a user runs it: exit 2, one line on stderr, no traceback."""
    args, expected = UNKNOWN_NAMES[1]
    proc = run("bench.run", *args)
    assert proc.returncode == 2
    assert expected in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "Traceback" not in proc.stderr


def test_list_shows_methods_impls_tasks_suites_and_profiles():
    proc = run("bench.list")
    assert proc.returncode == 0, proc.stderr
    for word in ("softmax", "reference", "kernel", "sdpa_math", "flex", "flash_attn", "scaling", "smoke", "h100_sxm",
                 "decode", "backward"):
        assert word in proc.stdout


def test_multirun_sweep_writes_rows_and_report(tmp_path):
    out = tmp_path / "run"
    proc = run("bench.run", "-m", "method=softmax", "impl=reference,sdpa", "task=scaling", "suite=smoke",
               "task.seq_len=[64,96]", "task.mode=[fwd,decode]", f"results_dir={out}",
               env={"ATTNBENCH_CACHE_DIR": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    df = load(out)
    assert set(df.impl) == {"reference", "sdpa"}
    assert set(df.status) == {"ok"}, df[["impl", "reason"]]
    # 2 lengths x (fwd causal + fwd non-causal + decode) per impl
    assert len(df) == 2 * 3 * 2
    assert set(df.kv_len) == {64, 96}
    assert (out / "report" / "leaderboard.md").exists()
    assert (out / "report" / "latency_vs_seq_len.png").exists()
    # a second run skips everything that is already ok
    again = run("bench.run", "method=softmax", "impl=sdpa", "task=scaling", "suite=smoke", "task.seq_len=[64,96]",
                "task.mode=[fwd,decode]", f"results_dir={out}", "report=false",
                env={"ATTNBENCH_CACHE_DIR": str(tmp_path / "cache")})
    assert again.returncode == 0 and "nothing new to measure" in again.stdout


BAD_VALUES = [
    (["method=sliding_window", "method.params.window=abc", "task=scaling"],
     "method sliding_window: parameter window must be an int >= 1, got 'abc'"),
    (["method=sliding_window", "+method.params.foo=1", "task=scaling"],
     "method sliding_window: unknown parameter 'foo'; parameters: window"),
    (["method=softmax", "impl=reference", "task=scaling", "task.dtype=float8"],
     "task scaling: unknown dtype 'float8'; choose from: float32"),
    (["method=softmax", "impl=reference", "task=scaling", "task.seq_len=-5"], "seq_len must be >= 1"),
]  # fmt: skip


@pytest.mark.parametrize("args,expected", BAD_VALUES)
def test_bad_values_are_rejected_while_planning(args, expected):
    """Planning, which runs before any measurement, rejects them on one line."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=args)
    with pytest.raises(ValueError) as err:
        plan_cells(cfg, torch.device("cpu"), "cpu")
    assert str(err.value).startswith(expected) and "\n" not in str(err.value)


def test_a_bad_value_fails_before_anything_runs(tmp_path):
    """One line, exit 2, no row written, and not even the CPU profile measured (the cache stays empty)."""
    args, expected = BAD_VALUES[0]
    out, cache = tmp_path / "run", tmp_path / "cache"
    proc = run("bench.run", *args, f"results_dir={out}", env={"ATTNBENCH_CACHE_DIR": str(cache)})
    assert proc.returncode == 2, proc.stdout[-2000:]
    assert proc.stderr.strip() == f"error: {expected}"
    assert not list(out.glob("*.parquet")) and not cache.exists()


def test_a_named_method_runs_on_suite_blocks_that_list_other_methods(tmp_path):
    """The smoke suite's needle blocks list other methods; naming one on the command line measures it there."""
    out = tmp_path / "run"
    proc = run("bench.run", "method=strided", "impl=reference", "task=needle", "suite=smoke", "task.seq_len=256",
               "report=false", f"results_dir={out}", env={"ATTNBENCH_CACHE_DIR": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr[-2000:]
    df = load(out)
    assert set(df.method) == {"strided"} and set(df.status) == {"ok"}
    assert {"single", "multikey"} <= set(df.variant)
