"""Scale-out: CPU workers give the same cells as a serial run, timing cells never run beside a busy worker,
shards split a sweep into whole point groups, and the options fail on one line."""

from __future__ import annotations

import pytest
import torch

import bench.sweep
from bench.measure.hardware import HardwareProfile
from bench.measure.timing import TimingConfig
from bench.results import load
from bench.schedule import Shard, parse_shard, point_groups, resolve_workers, shard_cells, worker_threads
from bench.sweep import RunSettings, run_cells
from tasks import get_task, task_defaults
from tasks.base import Cell

PROFILE = HardwareProfile("cpu", "cpu", "test cpu", {"float32": 1.0}, None, None, True, "test")
QUICK = TimingConfig(warmup=0, min_time_s=0.0, min_repeats=2, max_repeats=2, probe=False)
TINY = dict(steps=4, train_size=64, test_size=32, eval_every=2, batch_size=16)
SCALING = dict(dtype="float32", batch=1, heads=2, seq_len=64, kv_len=64, head_dim=16, causal=True, mode="fwd",
               input_dist="gaussian")
CPU = torch.device("cpu")


def mqar(method: str, seed: int = 0) -> Cell:
    point = get_task("mqar").normalise_point({**task_defaults("mqar"), **TINY})
    return Cell(method, "reference", "mqar", "cpu", point, {}, seed)


def scaling(impl: str, n: int = 64) -> Cell:
    return Cell("softmax", impl, "scaling", "cpu", {**SCALING, "seq_len": n, "kv_len": n})


def test_two_cpu_workers_give_the_cells_of_a_serial_run(tmp_path, monkeypatch):
    """Trained cells fan out over both workers and train to the same numbers; the timing cells run in this
    process, and only while no worker is busy (a timed op beside a training worker measures the neighbour)."""
    cells = [mqar("softmax"), mqar("linear"), scaling("reference"), scaling("sdpa"), mqar("identity"),
             mqar("softmax", seed=1), scaling("reference", 96)]  # fmt: skip
    serial = run_cells(cells, RunSettings(tmp_path / "serial", "s", CPU, PROFILE, QUICK, measure_memory=False),
                       log=lambda s: None)  # fmt: skip

    pools, timed_beside = [], []
    make_pool, measure_group = bench.sweep._pool, bench.sweep.measure_group
    monkeypatch.setattr(bench.sweep, "_pool", lambda *a: pools.append(make_pool(*a)) or pools[-1])

    def watched(group, settings):
        timed_beside.extend(p.busy() for p in pools)
        return measure_group(group, settings)

    monkeypatch.setattr(bench.sweep, "measure_group", watched)
    fanned = RunSettings(tmp_path / "workers", "w", CPU, PROFILE, QUICK, measure_memory=False, isolate="auto",
                         workers=2, threads=1)  # fmt: skip
    parallel = run_cells(cells, fanned, log=lambda s: None)

    assert sorted((r["cell_id"], r["status"]) for r in parallel) == sorted((r["cell_id"], r["status"]) for r in serial)
    assert len(timed_beside) == len(pools) * 2 and not any(timed_beside)  # two timing groups, pool idle each time
    on_disk = load(tmp_path / "workers").set_index("cell_id")
    trained = [c.cell_id for c in cells if c.task == "mqar"]
    assert set(on_disk.loc[trained, "worker"]) == {0, 1}  # both workers trained
    assert on_disk.drop(index=trained)["worker"].isna().all()  # timing cells: this process
    reference = load(tmp_path / "serial").set_index("cell_id")
    for column in ("accuracy", "final_loss", "steps_done"):  # same seed, one thread each: the same training
        assert on_disk.loc[trained, column].tolist() == reference.loc[trained, column].tolist(), column
    assert on_disk["host"].notna().all() and on_disk["shard"].isna().all()


def test_shards_take_whole_point_groups_and_cover_the_sweep_once():
    cells = [scaling(impl, n) for n in (64, 80, 96, 112, 128) for impl in ("reference", "sdpa", "sdpa_math")]
    groups = point_groups(cells)
    assert [len(g) for g in groups] == [3] * 5
    shards = [shard_cells(cells, Shard(i, 3)) for i in range(3)]
    assert sorted(c.cell_id for s in shards for c in s) == sorted(c.cell_id for c in cells)  # each cell once
    assert [len(s) for s in shards] == [3, 6, 6]
    for shard in shards:  # a point's implementations are timed together: never split across shards
        seqs = {c.point["seq_len"] for c in shard}
        assert all(sum(c.point["seq_len"] == n for c in shard) == 3 for n in seqs)
    assert shard_cells(cells, Shard(0, 8)) == [] and shard_cells(cells, None) == cells  # more shards than groups


@pytest.mark.parametrize("value,count,expected", [("1/4", None, Shard(1, 4)), (2, 8, Shard(2, 8)), ("0/1", None, Shard(0, 1)),
                                                  (None, None, None)])
def test_shard_forms(value, count, expected):
    assert parse_shard(value, count) == expected


@pytest.mark.parametrize("value", ["4/4", "a/b", "3", "-1/2", "1/0"])
def test_bad_shards_fail_on_one_line(value):
    with pytest.raises(ValueError, match=r"^shard .*(expected i/n|0\.\.n-1)") as err:
        parse_shard(value)
    assert "\n" not in str(err.value)


def test_workers_options():
    assert resolve_workers("auto", CPU, "auto") == 1
    assert resolve_workers(3, CPU, "auto") == 3
    with pytest.raises(ValueError, match=r"^workers=2 runs cells in worker processes; isolate=false contradicts it"):
        resolve_workers(2, CPU, "false")
    with pytest.raises(ValueError, match=r"^workers 'many': expected auto or an integer >= 1$"):
        resolve_workers("many", CPU, "auto")
    assert worker_threads(None, 1) is None and worker_threads(4, 2) == 4 and worker_threads(None, 64) == 1


def test_isolate_options():
    from bench.schedule import isolated, parse_isolate

    assert [parse_isolate(v) for v in ("auto", True, "false")] == ["auto", "true", "false"]
    with pytest.raises(ValueError, match=r"^isolate 'maybe': choose from: auto, true, false$"):
        parse_isolate("maybe")
    trained, timed = [mqar("softmax")], [scaling("sdpa")]
    assert isolated(trained, "auto", CPU) and not isolated(timed, "auto", CPU)
    assert isolated(timed, "auto", torch.device("cuda")) and not isolated(trained, "false", CPU)
