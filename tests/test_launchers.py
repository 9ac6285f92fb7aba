"""Hydra's launchers drive the sweep: shards as submitit jobs (submitit_local here, Slurm on a cluster) write one
results folder, the same cells as a serial run, and a re-submission runs nothing that has a row."""

from __future__ import annotations

import os
import subprocess
import sys

import yaml

import bench.run  # noqa: F401 - registers the run_id resolver
from bench.plan import CONF_DIR
from bench.results import load, read_rows, write_row

SWEEP = ("suite=smoke", "task=scaling", "method=softmax", "impl=[reference,sdpa]", "measure_memory=false",
         "+timing.probe=false")  # fmt: skip


def bench_run(*args: str, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "ATTNBENCH_RUN_ID": ""}  # as a user runs it: the launcher hands the run id to its jobs
    return subprocess.run([sys.executable, "-m", "bench.run", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip


def test_submitit_local_shards_write_the_cells_of_a_serial_run_and_only_the_missing_ones(tmp_path):
    """Two shards as submitit jobs into a folder that already holds 7 of the 20 rows (a re-submission after
    a pre-emption): only the 13 missing cells run, and the folder ends with exactly the serial run's cells."""
    serial = bench_run(*SWEEP, f"results_dir={tmp_path / 'serial'}", "report=false", cwd=tmp_path)
    assert serial.returncode == 0, serial.stderr
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    for row in read_rows(tmp_path / "serial")[:7]:  # 7 rows of the serial run, as loose files
        write_row(sharded, row)
    args = ("-m", "hydra/launcher=submitit_local", *SWEEP, f"results_dir={sharded}", "shard=range(2)", "shards=2")
    proc = bench_run(*args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    expected, got = load(tmp_path / "serial"), load(sharded)
    assert sorted(zip(got["cell_id"], got["status"], strict=True)) == sorted(zip(expected["cell_id"], expected["status"], strict=True))
    logs = "".join(p.read_text() for p in (sharded / ".submitit").rglob("*_log.out"))
    assert logs.count("skipped (ok row exists)") == 7 and logs.count("shard ") >= 2
    fresh = got[got["shard"].notna()]
    assert len(fresh) == 13 and set(fresh["shard"]) == {"0/2", "1/2"} and got["host"].notna().all()
    assert (sharded / "report" / "leaderboard.md").is_file()  # the last shard to finish wrote it


def test_the_slurm_launcher_config_names_a_gpu_array():
    """The shipped cluster config composes on the submitit Slurm launcher with one GPU per array task."""
    conf = yaml.safe_load((CONF_DIR / "hydra" / "launcher" / "slurm_gpu.yaml").read_text())
    assert conf["defaults"] == ["submitit_slurm"]
    assert conf["gpus_per_node"] == 1 and conf["tasks_per_node"] == 1 and conf["max_num_timeout"] >= 1
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=slurm_gpu"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher") and launcher.array_parallelism == 64
    assert launcher.gpus_per_node == 1 and launcher.partition == "gpu"
