"""What a task is to the runner, the report and compare: sweep points in, declared metric columns out.

A *cell* is one method implementation x one task x one hardware profile x one
sweep point. Its `cell_id` hashes exactly the keys that make it a different
measurement, so a re-run recognises finished cells and two runs can be
matched cell by cell.

A task *describes itself*: its sweep keys, its metric columns (unit, which
direction is better, how compare judges them), its headline metric for the
summary table, its Pareto axes and its report sections. The runner writes
the keys and metric declarations into every row, so a results folder says
what its columns mean even when read without this code; the report and
compare read those declarations and never name a task.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import pandas as pd
import torch

from bench.measure.checks import TimedCall, measure_call
from bench.measure.timing import TimingConfig
from methods.base import DTYPES, Attention

# The shape columns of every row (SDPA convention) and the other sweep keys every task understands.
SHAPE_KEYS = ("dtype", "batch", "heads", "seq_len", "kv_len", "head_dim", "causal", "mode")
# Builds a fresh instance of the cell's method implementation: a model builds one per layer.
AttentionFactory = Callable[[], Attention]
Better = Literal["higher", "lower"]
# How compare judges a metric: `samples` (bootstrap over raw latency samples), `drop` (an absolute fall,
# for accuracies), `growth` (a relative rise above a floor, for errors); None: shown, never judged.
Judge = Literal["samples", "drop", "growth"]


@dataclass(frozen=True)
class Metric:
    """One metric column a task writes."""

    name: str
    unit: str = ""  # "ms", "bytes", "fraction", "nats", ...: shown in headers
    better: Better | None = None  # None: descriptive (a chance level, a count), not ranked
    judge: Judge | None = None
    label: str = ""  # header text; the name when empty

    @property
    def header(self) -> str:
        arrow = {"higher": " ↑", "lower": " ↓"}.get(self.better or "", "")
        unit = f" ({self.unit})" if self.unit and self.unit != "fraction" else ""
        return f"{self.label or self.name}{unit}{arrow}"

    def as_dict(self) -> dict:
        return asdict(self)


# Columns the runner measures for every task that times a call (bench.measure.checks.measure_call).
LATENCY = Metric("latency_ms", "ms", "lower", "samples", "latency")
PEAK_MEMORY = Metric("peak_mem_bytes", "bytes", "lower", None, "peak memory")
TIMED_CALL_METRICS = (
    LATENCY,
    Metric("latency_ms_p10", "ms", None, None, "latency p10"),
    Metric("latency_ms_p90", "ms", None, None, "latency p90"),
    Metric("tflops", "TFLOP/s", "higher", None, "TFLOP/s"),
    Metric("pct_peak", "%", "higher", None, "% of peak"),
    PEAK_MEMORY,
)
FIDELITY_METRICS = (
    Metric("fidelity_rel", "", "lower", "growth", "fidelity (rel. error vs fp64)"),
    Metric("fidelity_max_abs", "", "lower", None, "max abs error"),
)


@dataclass
class SummaryColumn:
    """One column of the report's summary table: one value per (method, impl), with the point it was taken at."""

    metric: Metric
    where: str  # the point, e.g. "fwd non-causal float32 N=1024 B×H×D=1×8×64"
    values: pd.Series  # indexed by (method, impl)
    in_table: bool = True  # False: only an axis of the task's Pareto plot (e.g. the needle call's latency)

    @property
    def header(self) -> str:
        return f"{self.metric.header} @ {self.where}" if self.where else self.metric.header


def headline_mean(metric: Metric, ok: pd.DataFrame) -> list[SummaryColumn]:
    """The default summary column: a metric's mean per (method, impl) over the ok rows that have it."""
    if ok.empty or metric.name not in ok.columns:
        return []
    values = pd.to_numeric(ok[metric.name], errors="coerce").groupby([ok["method"], ok["impl"]]).mean()
    return [SummaryColumn(metric, "mean over cells", values.dropna())]


def quality_with_latency(task: Task, at: pd.DataFrame, quality: str, where: str) -> list[SummaryColumn]:
    """A trained task's summary: its quality metric's mean per (method, impl) over the rows `at`, and the
    forward latency over the same rows (only an axis of the task's Pareto plot, not a table column)."""
    by_impl = [at["method"], at["impl"]]
    return [
        SummaryColumn(task.metric(quality), where, pd.to_numeric(at[quality]).groupby(by_impl).mean()),
        SummaryColumn(task.metric("latency_ms"), where, pd.to_numeric(at["latency_ms"]).groupby(by_impl).mean(),
                      in_table=False),
    ]


@dataclass
class Section:
    """A task's part of the report: a heading, some text, a table of text cells and figures."""

    title: str
    text: str = ""
    table: pd.DataFrame | None = None  # cells as strings, headed by column names
    figures: list[Path] = field(default_factory=list)


@dataclass(frozen=True)
class Cell:
    method: str
    impl: str
    task: str
    hardware: str
    point: Mapping  # the sweep point: SHAPE_KEYS plus task-specific keys (depth, beta, ...)
    method_params: Mapping = field(default_factory=dict)
    seed: int = 0
    suite: str = "single"

    @property
    def cell_id(self) -> str:
        """Stable over runs: the suite is not part of it (the same cell in two suites is one measurement)."""
        key = {
            "method": self.method,
            "impl": self.impl,
            "task": self.task,
            "hardware": self.hardware,
            "point": dict(self.point),
            "method_params": dict(self.method_params),
            "seed": self.seed,
        }
        return hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def label(self) -> str:
        shown = " ".join(f"{k}={v}" for k, v in self.point.items())
        return f"{self.method}/{self.impl} {self.task} {shown}"


@dataclass
class PreparedCell:
    """A cell made ready to time: the columns measured so far (correctness, sizes) and the call to time.

    The runner times the prepared calls of one sweep point together, in alternating rounds
    (`bench.measure.checks.measure_calls`), and adds their timed columns to `row`.
    """

    row: dict
    call: TimedCall


@dataclass
class RunContext:
    """Everything a task needs from the runner besides the cell."""

    device: torch.device
    timing: TimingConfig
    peak_tflops: float | None = None  # hardware profile's dense peak for the cell's dtype
    measure_memory: bool = True
    checkpoint_dir: Path | None = None  # trained tasks checkpoint here, so an interrupted cell resumes
    cache_dir: Path | None = None  # kept across runs: trained models another task reuses (lm -> lm_swap)


def torch_dtype(name: str) -> torch.dtype:
    try:
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}[
            name
        ]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose from: float32, float16, bfloat16, float64") from None


def expand_points(defaults: Mapping, axes: Mapping) -> Iterator[dict]:
    """Cartesian product of the sweep axes over the task's default point; scalars are one-value axes."""
    base = dict(defaults)
    base.update({k: v for k, v in axes.items() if not isinstance(v, list | tuple)})
    swept = {k: list(v) for k, v in axes.items() if isinstance(v, list | tuple)}
    swept.update({k: list(v) for k, v in base.items() if isinstance(v, list | tuple) and k not in swept})
    for k in swept:
        base.pop(k, None)
    names = list(swept)
    for values in itertools.product(*(swept[n] for n in names)):
        yield {**base, **dict(zip(names, values, strict=True))}


class Task:
    """A task owns its data, its model recipe (if any), its metrics and its part of the report.

    Subclasses set the class attributes below and implement `run_cell`; the
    report and compare learn everything else from them (and from the rows).
    """

    name: str = ""
    description: str = ""
    keys: tuple[str, ...] = ()  # sweep keys beyond SHAPE_KEYS; every point key must be one of the two
    metrics: tuple[Metric, ...] = ()  # the metric columns run_cell returns that mean something to a reader
    headline: str = ""  # the metric of the summary table (one value per method and impl)
    pareto: tuple[str, str] | None = None  # (cost metric, quality metric) of the Pareto plot, from `summary`
    plots_vs_context: bool = False  # draw its latency and memory against the context length (kv_len)
    section_group: str | None = None  # tasks of one group (e.g. the LRA tasks) also share `group_sections`
    # Its cells train a model (minutes to hours, not one timed op): they run in a child process by default
    # (isolate=auto) and may run beside each other on CPU workers, where timed ops never do.
    trains: bool = False

    def metric(self, name: str) -> Metric:
        for m in self.metrics:
            if m.name == name:
                return m
        raise KeyError(f"task {self.name} declares no metric {name!r}; metrics: {', '.join(m.name for m in self.metrics)}")

    def normalise_point(self, point: dict) -> dict | None:
        """Fill derived keys (e.g. kv_len) and drop impossible points (return None)."""
        return point

    def check_point(self, point: Mapping) -> None:
        """Reject, on one line, a point with a key the task does not declare or a dtype nobody runs."""
        allowed = set(SHAPE_KEYS) | set(self.keys)
        unknown = sorted(set(point) - allowed)
        if unknown:
            raise ValueError(f"task {self.name}: unknown key(s) {', '.join(unknown)}; keys: {', '.join(sorted(allowed))}")
        dtype = point.get("dtype")
        if dtype is not None and dtype not in (*DTYPES, "float64"):
            raise ValueError(f"task {self.name}: unknown dtype {dtype!r}; choose from: {', '.join(DTYPES)}, float64")

    def points(self, defaults: Mapping, axes: Mapping) -> list[dict]:
        out = []
        for point in expand_points(defaults, axes):
            point = self.normalise_point(dict(point))
            if point is None:
                continue
            self.check_point(point)
            if point not in out:
                out.append(point)
        return out

    def row_keys(self, cell: Cell) -> list[str]:
        """The columns that identify a row of this task besides method, impl and task (written into each row)."""
        return [*SHAPE_KEYS, *(k for k in cell.point if k not in SHAPE_KEYS), "method_params"]

    def summary(self, ok: pd.DataFrame) -> list[SummaryColumn]:
        """The summary table's columns from this task's ok rows: by default the headline metric's mean per impl."""
        return headline_mean(self.metric(self.headline), ok) if self.headline else []

    def declarations(self) -> list[dict]:
        """The metric declarations a row carries (its `metrics` column): each Metric, and which is the headline."""
        return [{**m.as_dict(), "headline": m.name == self.headline} for m in self.metrics]

    def report_sections(self, rows: pd.DataFrame, out_dir: Path) -> list[Section]:
        """Sections beyond the generic per-cell tables (heat maps, a paper-layout table, ...); none by default."""
        return []

    def group_sections(self, rows: pd.DataFrame, out_dir: Path) -> list[Section]:
        """Sections over the rows of every task of `section_group` (a paper's table with one column per task),
        asked once per group of the first of its tasks present; none by default."""
        return []

    def prepare_cell(self, cell: Cell, make_attention: AttentionFactory, ctx: RunContext) -> PreparedCell | None:
        """Everything `run_cell` does but the timing, for a task whose cells are one timed call each.

        A task that implements it has the implementations of each sweep point timed together in
        alternating rounds (a burst of load then hits them all, so same-run ratios hold); None (the
        default) means the task times inside `run_cell`, one cell at a time.
        """
        return None

    def interleaves(self, cell: Cell) -> bool:
        """Whether this cell may be timed together with the other implementations of its point."""
        return type(self).prepare_cell is not Task.prepare_cell

    def run_cell(self, cell: Cell, make_attention: AttentionFactory, ctx: RunContext) -> dict:
        """Measure one cell and return its metric columns.

        `make_attention()` builds a fresh instance of the cell's method
        implementation: an op-level task calls it once, a model one per layer.

        Raise `methods.Unsupported` for a cell the implementation cannot do,
        `bench.measure.checks.WrongResult` for a result that fails its check; any other
        exception becomes an `error` row. A task that implements `prepare_cell` inherits this.
        """
        prepared = self.prepare_cell(cell, make_attention, ctx)
        if prepared is None:
            raise NotImplementedError(f"task {self.name} implements neither run_cell nor prepare_cell")
        call = prepared.call
        timed = measure_call(call.fn, ctx.device, ctx.timing, call.flops, call.peak_tflops, ctx.measure_memory)
        return {**prepared.row, **timed}
