"""A task describes itself: a toy task defined here, and registered only at run time, runs, reports and
compares with no edit anywhere else; and every registered implementation's smoke cells are ok or unsupported."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from bench import compare
from bench.measure.checks import measure_call
from bench.measure.hardware import HardwareProfile
from bench.measure.timing import TimingConfig
from bench.report import write_report
from bench.results import load, read_row, result_files, write_row
from bench.sweep import RunSettings, run_cells
from methods import METHODS
from methods.oracle import fidelity, oracle_attention
from tasks import TASKS, register_task
from tasks.base import LATENCY, SHAPE_KEYS, Cell, Metric, Section, Task
from tasks.registry import task_defaults

PROFILE = HardwareProfile("cpu", "cpu", "test cpu", {"float32": 1.0}, None, None, True, "test")
QUICK = TimingConfig(warmup=0, min_time_s=0.0, min_repeats=2, max_repeats=2)


class ToyTask(Task):
    """Agreement with exact attention, scored in [0, 1], over a `knob` (the softmax temperature of q)."""

    name = "toy_agreement"
    description = "a test task: 1 - relative error against the fp64 oracle"
    keys = ("knob",)
    metrics = (Metric("agreement", "fraction", "higher", "drop", "agreement"), LATENCY,
               Metric("wobble", "", "lower", "growth", "wobble"))  # fmt: skip
    headline = "agreement"
    pareto = ("latency_ms", "agreement")

    def run_cell(self, cell, make_attention, ctx):
        p = cell.point
        attn = make_attention()
        gen = torch.Generator().manual_seed(cell.seed)
        q, k, v = (torch.randn(p["batch"], p["heads"], p["seq_len"], p["head_dim"], generator=gen) for _ in range(3))
        q = q * float(p["knob"])
        with torch.no_grad():
            out = attn(q, k, v, causal=bool(p["causal"]))
        _, rel = fidelity(out, oracle_attention(q, k, v, causal=bool(p["causal"]), dtype=torch.float64))
        row = {"agreement": max(0.0, 1.0 - rel), "wobble": rel}
        row.update(measure_call(lambda: attn(q, k, v, causal=bool(p["causal"])), ctx.device, ctx.timing,
                                measure_memory=False))  # fmt: skip
        return row

    def report_sections(self, rows: pd.DataFrame, out_dir: Path) -> list[Section]:
        table = rows.groupby("method")["agreement"].mean().map("{:.3f}".format).reset_index()
        return [Section("Toy agreement by method", "Mean agreement per method.", table)]


@pytest.fixture
def toy_task():
    register_task(ToyTask)
    yield TASKS[ToyTask.name]
    del TASKS[ToyTask.name]


def toy_cells(task: Task) -> list[Cell]:
    defaults = dict(dtype="float32", batch=1, heads=2, seq_len=48, kv_len=48, head_dim=16, causal=False, mode="fwd")
    points = task.points(defaults, {"knob": [1.0, 4.0]})
    return [
        Cell(method, "reference", task.name, "cpu", point, params)
        for point in points
        for method, params in (("softmax", {}), ("sliding_window", {"window": 8}))
    ]


def test_toy_task_runs_reports_and_compares_with_no_edit_elsewhere(toy_task, tmp_path):
    base = tmp_path / "base"
    rows = run_cells(toy_cells(toy_task), RunSettings(base, "run1", torch.device("cpu"), PROFILE, QUICK),
                     log=lambda *_: None)  # fmt: skip
    assert [r["status"] for r in rows] == ["ok"] * 4
    df = load(base)
    assert set(df["keys"].map(tuple)) == {(*SHAPE_KEYS, "knob", "method_params")}  # rows name their keys
    declared = {m["name"]: m for m in json.loads(df["metrics"].iloc[0])}
    assert declared["agreement"]["headline"] and declared["agreement"]["better"] == "higher"
    exact = df[df["method"].eq("softmax")]["agreement"]
    assert (exact > 0.999).all() and (df[df["method"].eq("sliding_window")]["agreement"] < exact.min()).all()

    report = write_report(base).read_text()
    assert report.index("## Summary") < report.index("## Provenance")  # the summary leads
    summary = report.split("## Summary", 1)[1].split("\n## ", 1)[0]
    assert "toy_agreement: agreement ↑" in summary  # its headline, with its direction, from its declaration
    ranked = [line.split("|")[2].strip() for line in summary.splitlines() if line.startswith("| 1 ") or line.startswith("| 2 ")]
    assert ranked == ["softmax", "sliding_window"]  # exact attention agrees best and ranks first
    assert "Toy agreement by method" in report  # its own report section

    # A candidate whose sliding window agrees less: compare catches it from the rows' own declarations,
    # even once the task is no longer registered (a results folder read without the code that wrote it).
    cand = tmp_path / "cand"
    shutil.copytree(base, cand)
    for path in result_files(cand):
        row = read_row(path)
        if row["method"] == "sliding_window" and row["knob"] == 4.0:
            row["agreement"] -= 0.2
            write_row(cand, row)
    del TASKS[ToyTask.name]
    try:
        result = compare.compare_frames(load(base), load(cand))
    finally:
        register_task(ToyTask)
    assert result.matched == 4
    assert [(f.kind, "knob=4" in f.cell) for f in result.regressions] == [("agreement", True)]


def test_a_toy_task_rejects_a_key_it_does_not_declare(toy_task):
    defaults = dict(dtype="float32", batch=1, heads=2, seq_len=48, kv_len=48, head_dim=16, causal=False, mode="fwd")
    with pytest.raises(ValueError, match="task toy_agreement: unknown key.*knbo"):
        toy_task.points(defaults, {"knbo": 2.0})
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        toy_task.points({**defaults, "dtype": "float8"}, {"knob": 1.0})


def test_every_registered_task_has_defaults_and_declares_its_headline():
    for name, task in TASKS.items():
        defaults = task_defaults(name)
        assert set(defaults) <= set(SHAPE_KEYS) | set(task.keys), name
        assert task.headline in {m.name for m in task.metrics}, name
        if task.pareto:
            assert set(task.pareto) <= {m.name for m in task.metrics}, name


# ---------------------------------------------------------------- every implementation, through the runner

SMOKE_POINT = dict(dtype="float32", batch=1, heads=2, seq_len=64, kv_len=64, head_dim=32, input_dist="gaussian")
MODES = (dict(mode="fwd", causal=True), dict(mode="fwd", causal=False), dict(mode="fwd_bwd", causal=True),
         dict(mode="fwd_bwd", causal=False), dict(mode="decode", causal=True, seq_len=1))  # fmt: skip
SMALL_PARAMS = {"window": 16, "block": 32, "top_k": 16, "num_landmarks": 8, "sample_size": 16, "min_seq_len": 32,
                "query_chunk": 32, "key_chunk": 32, "stride": 16, "summary": 4, "top_blocks": 2, "nb_features": 32,
                "k": 16}  # fmt: skip


def small_params(method: str) -> dict:
    """The method's declared defaults, shrunk where a parameter would make 64 tokens dense."""
    declared = {p.name: p.default for p in METHODS[method].params}
    return {name: SMALL_PARAMS.get(name, default) for name, default in declared.items()}


@pytest.mark.parametrize(
    "method,impl", [(m, i) for m, spec in METHODS.items() for i in spec.impls], ids=lambda x: str(x)
)
def test_every_implementation_is_ok_or_honestly_unsupported(method, impl, tmp_path):
    """Issue 10 point 8: a smoke cell is never `error` or `wrong`; an unsupported one says why."""
    cells = [Cell(method, impl, "scaling", "cpu", {**SMOKE_POINT, **m}, small_params(method)) for m in MODES]
    settings = RunSettings(tmp_path, "run1", torch.device("cpu"), PROFILE, QUICK, measure_memory=False)
    rows = run_cells(cells, settings, log=lambda *_: None)
    for row in rows:
        assert row["status"] in ("ok", "unsupported"), (row["mode"], row["causal"], row["reason"])
        assert row["status"] == "ok" or row["reason"]
