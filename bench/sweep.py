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

from bench.disturbed import describe
from bench.measure.checks import WrongResult, measure_calls
from bench.measure.hardware import HardwareProfile
from bench.measure.provenance import device_name, now_iso, provenance
from bench.measure.timing import CellTimeout, TimingConfig
from bench.results import CORE_COLUMNS, finished_cells, write_row
from methods import Unsupported, build, get_impl, get_method
from methods.registry import interpreted
from tasks import Cell, RunContext, get_task
from tasks.base import SHAPE_KEYS, PreparedCell, Task

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


def _context(settings: RunSettings, cell: Cell) -> RunContext:
    return RunContext(
        device=settings.device,
        timing=settings.timing,
        peak_tflops=settings.profile.peak_for(cell.point.get("dtype", "float32")),
        measure_memory=settings.measure_memory,
        checkpoint_dir=settings.results_dir / "checkpoints",
        cache_dir=settings.cache_dir,
    )


def _factory(cell: Cell):
    params = dict(cell.method_params)
    return lambda: build(cell.method, impl=cell.impl, **params)


def _guard(cell: Cell, settings: RunSettings) -> None:
    reason = get_impl(cell.method, cell.impl).guard(settings.device)
    if reason:
        raise Unsupported(reason)


def _fail(row: dict, err: BaseException) -> None:
    row["status"], row["reason"] = classify(err)


def _cleanup(settings: RunSettings) -> None:
    gc.collect()
    if settings.device.type == "cuda":
        torch.cuda.empty_cache()


def measure_cell(cell: Cell, settings: RunSettings) -> dict:
    """The row for one cell, whatever happens inside it (KeyboardInterrupt aside)."""
    row = base_row(cell, settings)
    started = time.perf_counter()
    try:
        _guard(cell, settings)
        row.update(get_task(cell.task).run_cell(cell, _factory(cell), _context(settings, cell)))
        row["status"], row["reason"] = "ok", ""
    except Exception as err:  # noqa: BLE001 - every failure becomes a row; the sweep goes on
        _fail(row, err)
    finally:
        _cleanup(settings)
    row["cell_seconds"] = time.perf_counter() - started
    row["timestamp"] = now_iso()
    return row


def measure_point(cells: list[Cell], settings: RunSettings) -> list[dict]:
    """The rows of one sweep point's implementations, timed together in alternating rounds.

    Each cell is prepared on its own (a failing guard or correctness check is that cell's row, not
    the point's); the calls that are left are timed by `measure_calls`, so a burst of load hits all
    of them and their same-run ratios hold. `cell_seconds` is a cell's preparation plus an equal
    share of the point's timing.
    """
    rows, prepared = [], []
    for cell in cells:
        started = time.perf_counter()
        row = base_row(cell, settings)
        try:
            _guard(cell, settings)
            ready = get_task(cell.task).prepare_cell(cell, _factory(cell), _context(settings, cell))
            assert isinstance(ready, PreparedCell), f"task {cell.task} prepared no call"
            prepared.append((row, ready))
        except Exception as err:  # noqa: BLE001
            _fail(row, err)
        rows.append(row)
        row["cell_seconds"] = time.perf_counter() - started
    started = time.perf_counter()
    try:
        timed = measure_calls([ready.call for _, ready in prepared], settings.device, settings.timing,
                              settings.measure_memory)  # fmt: skip
    except Exception as err:  # noqa: BLE001 - the probe itself failed: every prepared cell fails with it
        timed = [err] * len(prepared)
    share = (time.perf_counter() - started) / max(1, len(prepared))
    for (row, ready), result in zip(prepared, timed, strict=True):
        row["cell_seconds"] += share
        if isinstance(result, Exception):
            _fail(row, result)
            continue
        row.update({**ready.row, **result})
        row["status"], row["reason"] = "ok", ""
    del prepared, timed
    _cleanup(settings)
    for row in rows:
        row["timestamp"] = now_iso()
    return rows


def point_groups(cells: list[Cell]) -> list[list[Cell]]:
    """Consecutive cells of one task, point and seed whose task interleaves them; every other cell alone."""
    groups: list[list[Cell]] = []
    key = None
    for cell in cells:
        together = get_task(cell.task).interleaves(cell)
        this = (cell.task, json.dumps(dict(cell.point), sort_keys=True, default=str), cell.seed) if together else None
        if this is not None and this == key:
            groups[-1].append(cell)
        else:
            groups.append([cell])
        key = this
    return groups


def run_cells(cells: Iterable[Cell], settings: RunSettings, log=print) -> list[dict]:
    """Measure and write each cell; skip cells with an `ok` row unless `force`. Returns the rows written."""
    cells = list(cells)
    done = set() if settings.force else finished_cells(settings.results_dir)
    index = {cell.cell_id: i for i, cell in enumerate(cells, 1)}
    written = []
    # What exists now (modules: torch, sympy, pandas, ...) lives for the whole sweep: freezing it keeps the
    # collection after each cell to the cell's own garbage (a full collection here costs ~0.2 s a cell).
    gc.freeze()
    try:
        for group in point_groups(cells):
            todo = []
            for cell in group:
                if cell.cell_id in done:
                    log(f"[{index[cell.cell_id]}/{len(cells)}] {cell.label()}: skipped (ok row exists)")
                else:
                    todo.append(cell)
            if not todo:
                continue
            interleave = len(todo) > 1 or get_task(todo[0].task).interleaves(todo[0])
            rows = measure_point(todo, settings) if interleave else [measure_cell(todo[0], settings)]
            for cell, row in zip(todo, rows, strict=True):
                write_row(settings.results_dir, row)
                _log_row(f"[{index[cell.cell_id]}/{len(cells)}] {cell.label()}", row, log)
                written.append(row)
    finally:
        gc.unfreeze()
    return written


def _log_row(prefix: str, row: dict, log) -> None:
    latency = f" {row['latency_ms']:.3f} ms" if row.get("latency_ms") is not None else ""
    noisy = f" (noisy: {describe(row)})" if row.get("noisy") else ""
    log(f"{prefix}: {row['status']}{latency}{noisy}{' - ' + row['reason'] if row['reason'] else ''}")
    sys.stdout.flush()
