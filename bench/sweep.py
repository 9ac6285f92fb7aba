"""Turns cells into rows (the CLI is `bench.run`). One cell failing never stops the sweep: it becomes a row
with a status and a reason. Every row names its key columns and declares its task's metrics, so a results
folder is self-describing."""

from __future__ import annotations

import dataclasses
import gc
import json
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.disturbed import describe
from bench.measure.checks import WrongResult, measure_calls
from bench.measure.hardware import HardwareProfile
from bench.measure.provenance import device_name, now_iso, provenance
from bench.measure.timing import CellTimeout, TimingConfig
from bench.results import CORE_COLUMNS, cell_path, finished_cells, read_row, write_rows
from bench.schedule import isolated, parallel, point_groups, visible_gpus
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
    isolate: str = "false"  # auto | true | false: groups in worker processes (bench.schedule.isolated)
    cell_timeout_s: float = 3600.0  # isolated: a group with no result after this long is killed (`timeout`)
    workers: int = 1  # worker processes (bench.schedule: one per GPU; on CPU only trained cells side by side)
    threads: int | None = None  # torch CPU threads in each worker
    shard: str | None = None  # "i/n": which shard of the sweep this process runs (recorded in its rows)
    worker: int | None = None  # which worker this process is (None: the sweep itself)
    plugins: tuple[str, ...] = ()  # modules a worker imports first: methods or tasks registered outside the tree


def settings_to_json(settings: RunSettings) -> dict:
    """What a worker process needs to measure as the sweep would (bench.worker)."""
    out = dataclasses.asdict(settings)
    out.update(results_dir=str(settings.results_dir), device=str(settings.device), profile=dataclasses.asdict(settings.profile),
               timing=dataclasses.asdict(settings.timing), plugins=list(settings.plugins),
               cache_dir=str(settings.cache_dir) if settings.cache_dir is not None else None)  # fmt: skip
    return out


def settings_from_json(spec: dict, worker: int) -> RunSettings:
    """A worker's settings: the sweep's, measured in-process (a worker isolates nothing further). A worker pinned
    to one GPU with CUDA_VISIBLE_DEVICES sees it as cuda:0."""
    device = torch.device(spec["device"])
    if device.type == "cuda":
        device = torch.device("cuda")
    fields = {f.name for f in dataclasses.fields(RunSettings)}
    return RunSettings(**{**{k: v for k, v in spec.items() if k in fields}, "results_dir": Path(spec["results_dir"]),
                          "device": device, "profile": HardwareProfile(**spec["profile"]),
                          "timing": TimingConfig(**spec["timing"]), "plugins": tuple(spec["plugins"]),
                          "cache_dir": Path(spec["cache_dir"]) if spec.get("cache_dir") else None,
                          "isolate": "false", "workers": 1, "worker": worker})  # fmt: skip


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
        worker=settings.worker,
        shard=settings.shard,
    )
    return row


def failure_row(cell: Cell, settings: RunSettings, status: str, reason: str, worker: int | None) -> dict:
    """The row of a cell whose worker crashed or hung before writing it."""
    row = base_row(cell, settings)
    row.update(status=status, reason=reason[:REASON_CHARS], worker=worker, timestamp=now_iso())
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


def measure_group(cells: Sequence[Cell], settings: RunSettings) -> list[dict]:
    """The rows of one point group (bench.schedule.point_groups), in this process."""
    cells = list(cells)
    if len(cells) > 1 or get_task(cells[0].task).interleaves(cells[0]):
        return measure_point(cells, settings)
    return [measure_cell(cells[0], settings)]


def _pool(settings: RunSettings, on_rows, on_failure, log):
    from bench.isolation import WorkerPool

    spec = settings_to_json(settings)
    return WorkerPool(settings.workers, spec, settings.cell_timeout_s, visible_gpus(settings.device),
                      on_rows, on_failure, log)  # fmt: skip


def run_cells(cells: Iterable[Cell], settings: RunSettings, log=print) -> list[dict]:
    """Measure and write each cell; skip cells with an `ok` row unless `force`. Returns the rows written.

    Groups run in this process or, isolated, on worker processes (bench.schedule says which and beside what):
    a group that may not run beside others waits until every worker is idle.
    """
    cells = list(cells)
    settings.results_dir.mkdir(parents=True, exist_ok=True)
    done = set() if settings.force else finished_cells(settings.results_dir)
    index = {cell.cell_id: i for i, cell in enumerate(cells, 1)}
    written: list[dict] = []

    def record(cell: Cell, row: dict) -> None:
        _log_row(f"[{index[cell.cell_id]}/{len(cells)}] {cell.label()}", row, log)
        written.append(row)

    def worker_rows(group: list[Cell], worker: int) -> None:
        for cell in group:
            try:
                record(cell, read_row(cell_path(settings.results_dir, cell.cell_id)))
            except Exception:  # noqa: BLE001 - compacted away by a peer shard: written all the same
                record(cell, {"cell_id": cell.cell_id, "status": "ok", "reason": "", "worker": worker})

    def failed(group: list[Cell], status: str, reason: str, worker: int) -> None:
        rows = [failure_row(cell, settings, status, reason, worker) for cell in group]
        write_rows(settings.results_dir, rows)
        for cell, row in zip(group, rows, strict=True):
            record(cell, row)

    pool = None
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
            if not isolated(todo, settings.isolate, settings.device):
                if pool is not None:
                    pool.drain()
                rows = measure_group(todo, settings)
                write_rows(settings.results_dir, rows)
                for cell, row in zip(todo, rows, strict=True):
                    record(cell, row)
                continue
            pool = pool or _pool(settings, worker_rows, failed, log)
            alongside = settings.workers > 1 and parallel(todo, settings.device)
            if not alongside:
                pool.drain()
            pool.submit(todo)
            if not alongside:
                pool.drain()
        if pool is not None:
            pool.drain()
    except BaseException:
        if pool is not None:
            pool.close(kill=True)
            pool = None
        raise
    finally:
        if pool is not None:
            pool.close()
        gc.unfreeze()
    return written


def _log_row(prefix: str, row: dict, log) -> None:
    latency = f" {row['latency_ms']:.3f} ms" if row.get("latency_ms") is not None else ""
    noisy = f" (noisy: {describe(row)})" if row.get("noisy") else ""
    log(f"{prefix}: {row['status']}{latency}{noisy}{' - ' + row['reason'] if row['reason'] else ''}")
    sys.stdout.flush()
