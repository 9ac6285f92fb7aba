"""The command line end to end, as a user runs it (subprocesses, so Hydra is exercised for real)."""

import os
import subprocess
import sys

import pytest

from bench.provenance import REPO_ROOT
from bench.results import load


def run(*args, env=None):
    full_env = {**os.environ, "ATTNBENCH_RUN_ID": "test-run", **(env or {})}
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO_ROOT, capture_output=True, text=True, env=full_env,
                          timeout=600)


@pytest.mark.parametrize(
    "args,expected",
    [
        (["method=sofmax"], "unknown method 'sofmax'; choose from: "),
        (["method=softmax", "impl=fastest"], "unknown impl of softmax 'fastest'; choose from: flash_attn, flex"),
        (["task=haystack"], "unknown task 'haystack'; choose from:"),
        (["hardware=tpu_v5"], "unknown hardware 'tpu_v5'; choose from: a100_80gb"),
        (["suite=huge"], "unknown suite 'huge'; choose from: auto, cpu"),
        (["-m", "method=softmax,nope"], "unknown method 'nope'"),
    ],
)
def test_unknown_names_fail_at_once_with_the_choices(args, expected):
    """One line on stderr, exit 2, the valid names listed (softmax is always among the methods)."""
    proc = run("bench.run", *args)
    assert proc.returncode == 2
    assert expected in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "Traceback" not in proc.stderr
    if args == ["method=sofmax"]:
        assert "softmax" in proc.stderr.split("choose from:")[1]


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
