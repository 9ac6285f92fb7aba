"""Turns cells into rows (the CLI is `bench.run`). One cell failing never stops the sweep: it becomes a row
with a status and a reason. Every row names its key columns and declares its task's metrics, so a results
folder is self-describing."""

from __future__ import annotations

import gc
import json
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.measure.checks import WrongResult
from bench.measure.hardware import HardwareProfile
from bench.measure.provenance import device_name, now_iso, provenance
from bench.measure.timing import CellTimeout, TimingConfig
from bench.results import CORE_COLUMNS, finished_cells, write_row
from methods import Unsupported, build, get_impl, get_method
from methods.registry import interpreted
from tasks import Cell, RunContext, get_task
from tasks.base import SHAPE_KEYS, Task

REASON_CHARS = 300


@dataclass
class RunSettings:
    results_dir: Path
    run_id: str
    device: torch.device
    profile: HardwareProfile
    timing: TimingConfig
    force: bool = False
    measure_memory: bool = True
    config_yaml: str = ""
    cache_dir: Path | None = None  # shared by runs (trained models a later cell reuses)


def one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    line = f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")
    return line if len(line) <= REASON_CHARS else line[: REASON_CHARS - 3] + "..."


def _is_oom(err: BaseException) -> bool:
    if isinstance(err, torch.OutOfMemoryError | MemoryError):
        return True
    return isinstance(err, RuntimeError) and ("can't allocate memory" in str(err) or "out of memory" in str(err))


def classify(err: BaseException) -> tuple[str, str]:
    """(status, reason) for an exception raised while measuring a cell."""
    if isinstance(err, Unsupported):
        return "unsupported", str(err).splitlines()[0]
    if isinstance(err, WrongResult):
        return "wrong", str(err).splitlines()[0]
    if isinstance(err, CellTimeout):
        return "timeout", str(err).splitlines()[0]
    if _is_oom(err):
        return "oom", one_line(err)
    return "error", one_line(err)


def metric_declarations(task: Task) -> str:
    """The task's metric columns as JSON (unit, direction, how compare judges them, which is the headline)."""
    return json.dumps(task.declarations())


def base_row(cell: Cell, settings: RunSettings) -> dict:
    """Every core column, with the cell's keys, declarations and provenance filled and the metrics empty."""
    spec = get_method(cell.method)
    task = get_task(cell.task)
    impl = get_impl(cell.method, cell.impl)
    row = dict.fromkeys(CORE_COLUMNS)
    row.update({k: cell.point.get(k) for k in SHAPE_KEYS})
    row.update({k: v for k, v in cell.point.items() if k not in SHAPE_KEYS})  # task keys: depth, beta, ...
    row.update(provenance())
    row.update(
        run_id=settings.run_id,
        cell_id=cell.cell_id,
        method=cell.method,
        impl=cell.impl,
        impl_kind=impl.kind,
        family=spec.family,
        exact=spec.exact,
        task=cell.task,
        suite=cell.suite,
        hardware=settings.profile.name,
        device=device_name(settings.device),
        seed=cell.seed,
        method_params=json.dumps(dict(cell.method_params), sort_keys=True),
        interpreted=interpreted(impl.kind, settings.device),
        config_yaml=settings.config_yaml,
        keys=task.row_keys(cell),
        metrics=metric_declarations(task),
    )
    return row


def measure_cell(cell: Cell, settings: RunSettings) -> dict:
    """The row for one cell, whatever happens inside it (KeyboardInterrupt aside)."""
    row = base_row(cell, settings)
    started = time.perf_counter()
    try:
        reason = get_impl(cell.method, cell.impl).guard(settings.device)
        if reason:
            raise Unsupported(reason)
        task = get_task(cell.task)
        params = dict(cell.method_params)
        ctx = RunContext(
            device=settings.device,
            timing=settings.timing,
            peak_tflops=settings.profile.peak_for(cell.point.get("dtype", "float32")),
            measure_memory=settings.measure_memory,
            checkpoint_dir=settings.results_dir / "checkpoints",
            cache_dir=settings.cache_dir,
        )
        row.update(task.run_cell(cell, lambda: build(cell.method, impl=cell.impl, **params), ctx))
        row["status"], row["reason"] = "ok", ""
    except Exception as err:  # noqa: BLE001 - every failure becomes a row; the sweep goes on
        row["status"], row["reason"] = classify(err)
    finally:
        gc.collect()
        if settings.device.type == "cuda":
            torch.cuda.empty_cache()
    row["cell_seconds"] = time.perf_counter() - started
    row["timestamp"] = now_iso()
    return row


def run_cells(cells: Iterable[Cell], settings: RunSettings, log=print) -> list[dict]:
    """Measure and write each cell; skip cells with an `ok` row unless `force`. Returns the rows written."""
    cells = list(cells)
    done = set() if settings.force else finished_cells(settings.results_dir)
    # What exists now (modules: torch, sympy, pandas, ...) lives for the whole sweep: freezing it keeps the
    # collection after each cell to the cell's own garbage (a full collection here costs ~0.2 s a cell).
    gc.freeze()
    try:
        return [row for i, cell in enumerate(cells, 1) if (row := _run_one(cell, i, len(cells), done, settings, log))]
    finally:
        gc.unfreeze()


def _run_one(cell: Cell, i: int, n: int, done: set[str], settings: RunSettings, log) -> dict | None:
    """Measure and write one cell, or skip it (None) when it already has an ok row."""
    prefix = f"[{i}/{n}] {cell.label()}"
    if cell.cell_id in done:
        log(f"{prefix}: skipped (ok row exists)")
        return None
    row = measure_cell(cell, settings)
    write_row(settings.results_dir, row)
    latency = f" {row['latency_ms']:.3f} ms" if row.get("latency_ms") is not None else ""
    log(f"{prefix}: {row['status']}{latency}{' - ' + row['reason'] if row['reason'] else ''}")
    sys.stdout.flush()
    return row
