"""The summary table, first in every report: one row per method and implementation, every task side by side.

Each task says what its column(s) are (`Task.summary`: a metric at a stated
point, one value per method and impl); the report puts them side by side and
ranks the rows. The ranking rule, stated under the table: each column ranks the
rows that have a value in it, in its metric's direction (ties share the best
rank); a row's score is the mean of its ranks over the columns it has values
for; ties go to the row with more columns, then by name. Interpreted-kernel rows
are left out: their latency says nothing about the kernel.

A task this code does not know (its rows declare it) gets the default column:
its declared headline metric's mean per method and impl.

A timing value (latency, training time, throughput) that rests on a row the
interference probe found disturbed is marked † (`disturbed_marks`), with the
mark's meaning under the table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pandas as pd

from bench.disturbed import TIMING_COLUMNS, disturbed_mask, is_timing_metric
from bench.report.document import Part, Table
from bench.report.format import DISTURBED_NOTE, MISSING, fmt_metric, marked, metric_header
from bench.report.rows import row_metrics
from tasks import TASKS
from tasks.base import SummaryColumn, headline_mean

RULE = (
    "Ranked by mean rank: each column ranks the rows that have a value in it, in its metric's direction "
    "(↑ higher is better, ↓ lower is better; ties share the best rank); a row's score is the mean of its ranks over "
    "the columns it has values for (ties: more columns first, then by name)."
)
INDEX = ["method", "impl"]
SHIFT = 2.0  # disturbed rows' timing values are scaled by this to find which summary values rest on them


@dataclass
class TaskSummary:
    """One task's summary columns on one hardware profile (table columns and Pareto-only ones alike)."""

    task: str
    hardware: str
    columns: list[SummaryColumn]
    # Per column: the (method, impl) whose value rests on a disturbed row's timing (`disturbed_marks`).
    marks: list[set[tuple[str, str]]] = field(default_factory=list)

    def marked(self, i: int) -> set[tuple[str, str]]:
        return self.marks[i] if i < len(self.marks) else set()


def default_columns(task: str, ok: pd.DataFrame) -> list[SummaryColumn]:
    """For a task the registry does not know: its declared headline's mean per (method, impl)."""
    metrics, headline = row_metrics(ok)
    metric = next((m for m in metrics if m.name == headline), None)
    return [] if metric is None else headline_mean(metric, ok)


def task_columns(task: str, rows: pd.DataFrame) -> list[SummaryColumn]:
    """A task's summary columns: its own `summary`, or the default column for a task the registry does not know."""
    return TASKS[task].summary(rows) if task in TASKS else default_columns(task, rows)


def timing_names(rows: pd.DataFrame) -> list[str]:
    """The columns of these rows whose values come from the clock: the runner's and any declared timing metric."""
    metrics, _ = row_metrics(rows)
    names = [*TIMING_COLUMNS, *(m.name for m in metrics if is_timing_metric(m.name, m.unit, m.judge))]
    return [c for c in dict.fromkeys(names) if c in rows.columns]


def shifted(rows: pd.DataFrame, mask: pd.Series) -> pd.DataFrame:
    """The rows with the masked rows' timing values scaled by SHIFT (numeric columns only; the rest as they are)."""
    out = rows.copy()
    for col in timing_names(rows):
        values = pd.to_numeric(out[col], errors="coerce")
        if values.notna().sum() == out[col].notna().sum():  # numbers throughout: nothing else changes
            out[col] = values.where(~mask, values * SHIFT)
    return out


def column_key(column: SummaryColumn) -> tuple:
    return column.metric.name, column.where, column.in_table


def moved(values: pd.Series, again: pd.Series | None, fallback: set[tuple[str, str]]) -> set[tuple[str, str]]:
    """The (method, impl) whose value differs in `again` (or, without `again`, those in `fallback`)."""
    before = as_index(values)
    keys = [k for k, v in before.items() if _finite(v)]
    if again is None:
        return {k for k in keys if k in fallback}
    after = as_index(again)
    after = after[~after.index.duplicated()]
    out = set()
    for k in keys:
        v = after.get(k)
        if not _finite(v) or not math.isclose(float(before[k]), float(v), rel_tol=1e-9, abs_tol=0.0):
            out.add(k)
    return out


def _finite(v: object) -> bool:
    number = pd.to_numeric(pd.Series([v]), errors="coerce").iloc[0]
    return bool(pd.notna(number) and math.isfinite(float(number)))


def disturbed_marks(task: str, rows: pd.DataFrame, columns: list[SummaryColumn]) -> list[set[tuple[str, str]]]:
    """Per summary column, the (method, impl) whose timing value rests on a row the probe found disturbed.

    A task's summary picks and aggregates rows its own way (a reference point, a median over patterns, the
    best lr), so which rows a value came from is not known here. Instead the summary is asked again with the
    disturbed rows' timing values scaled: a value that moves rests on them, one that does not (a median
    that a disturbed row did not set) does not. Scaling rather than dropping them keeps every row where the
    task looks for it, so its choice of point does not change. Only timing columns are checked: load does not
    disturb memory or accuracy. When the second summary fails, every timing value of a method/impl with a
    disturbed row is marked: the safe side.
    """
    mask = disturbed_mask(rows)
    timing = [is_timing_metric(c.metric.name, c.metric.unit, c.metric.judge) for c in columns]
    if not mask.any() or not any(timing):
        return [set() for _ in columns]
    try:
        again = {column_key(c): c.values for c in task_columns(task, shifted(rows, mask))}
    except Exception:  # a task's code on rows it did not expect: fall back to marking by method/impl
        again = {}
    fallback = set(zip(rows.loc[mask, "method"].astype(str), rows.loc[mask, "impl"].astype(str), strict=True))
    return [moved(c.values, again.get(column_key(c)), fallback) if t else set()
            for c, t in zip(columns, timing, strict=True)]  # fmt: skip


def summarise(df: pd.DataFrame) -> tuple[list[TaskSummary], list[str]]:
    """Every task's summary columns per hardware profile from the ok, compiled rows; notes on tasks that gave none.

    A task whose `summary` fails (rows of an older version of the task may lack a column it reads) gets a note
    naming the error instead of silently missing from the table.
    """
    ok = df[df["status"].eq("ok") & ~df["_interp"]]
    out, notes = [], []
    for (hw, task), rows in ok.groupby(["_hw", "_task"], sort=True):
        try:
            columns = task_columns(task, rows)
        except Exception as err:  # a task's code on old rows: report it, keep the rest of the summary
            notes.append(f"{task}: no summary column ({type(err).__name__}: {err})".splitlines()[0])
            continue
        if columns:
            out.append(TaskSummary(task, hw, columns, disturbed_marks(task, rows, columns)))
    return out, notes


def as_index(values: pd.Series) -> pd.Series:
    """The values indexed by (method, impl) as plain strings, whatever the task named its index levels."""
    index = pd.MultiIndex.from_tuples([tuple(str(x) for x in ix) for ix in values.index], names=INDEX)
    return pd.Series(values.to_numpy(), index=index)


def rank(values: pd.DataFrame, directions: list[str | None]) -> pd.DataFrame:
    """`mean_rank` and `n_ranked` per row, and the rows in ranked order (best first)."""
    ranks = pd.DataFrame(index=values.index)
    for col, better in zip(values.columns, directions, strict=True):
        if better in ("higher", "lower"):
            ranks[col] = pd.to_numeric(values[col], errors="coerce").rank(ascending=better == "lower", method="min")
    out = pd.DataFrame({"mean_rank": ranks.mean(axis=1), "n_ranked": ranks.notna().sum(axis=1)}, index=values.index)
    names = out.index.to_frame(index=False)
    order = names.assign(mean_rank=out["mean_rank"].to_numpy(), n=-out["n_ranked"].to_numpy())
    order = order.sort_values(["mean_rank", "n", *INDEX], na_position="last", kind="stable")
    return out.iloc[order.index]


def summary_table(summaries: list[TaskSummary], table_id: str) -> Table:
    """The summary of one hardware profile: '#', method, impl, a column per task summary column, 'mean rank'."""
    columns = [(s.task, c) for s in summaries for c in s.columns if c.in_table]
    marks = [s.marked(i) for s in summaries for i, c in enumerate(s.columns) if c.in_table]
    values = pd.concat([as_index(c.values) for _, c in columns], axis=1, keys=range(len(columns)))
    values = values.apply(pd.to_numeric, errors="coerce")
    headers = [f"{task}: {metric_header(c.metric, values[i])}" + (f" @ {c.where}" if c.where else "")
               for i, (task, c) in enumerate(columns)]  # fmt: skip
    ranked = rank(values, [c.metric.better for _, c in columns])
    values = values.loc[ranked.index]
    names = values.index.to_frame(index=False)
    cells = pd.DataFrame({"#": [str(i + 1) for i in range(len(values))], **{k: names[k] for k in INDEX}})
    sort_keys = pd.DataFrame({"#": range(1, len(values) + 1)})
    for i, (header, (_, c)) in enumerate(zip(headers, columns, strict=True)):
        cells[header] = fmt_metric(values[i].reset_index(drop=True), c.metric)
        cells[header] = marked(cells[header], pd.Series([ix in marks[i] for ix in values.index]))
        sort_keys[header] = values[i].to_numpy()
    mean_rank = ranked["mean_rank"].reset_index(drop=True)
    cells["mean rank"] = mean_rank.map(lambda r: MISSING if pd.isna(r) else f"{r:.2f}")
    sort_keys["mean rank"] = mean_rank
    note = DISTURBED_NOTE + " Here a value is marked when it rests on such a row (it moves when that row's timing does)." if any(
        ix in m for m in marks for ix in values.index) else ""  # fmt: skip
    return Table(cells, id=table_id, sort_keys=sort_keys, numeric=("#", *headers, "mean rank"), note=note)


def summary_parts(summaries: list[TaskSummary], notes: list[str], n_interp: int) -> list[Part]:
    """The summary part(s): one table per hardware profile, with the ranking rule and what was left out."""
    text = [RULE]
    if n_interp:
        text.append(f"Interpreted-kernel rows (Triton CPU interpreter, {n_interp} ok rows) are excluded: their "
                    "latency says nothing about the kernel; they are in the per-cell tables.")  # fmt: skip
    text += notes
    by_hw: dict[str, list[TaskSummary]] = {}
    for s in summaries:
        if any(c.in_table for c in s.columns):
            by_hw.setdefault(s.hardware, []).append(s)
    if not by_hw:
        return [Part("Summary", text=[*text, "No task gave a summary column (no ok, compiled rows to summarise)."])]
    many = len(by_hw) > 1
    tables = []
    for i, (hw, group) in enumerate(sorted(by_hw.items())):
        table = summary_table(group, "summary" if i == 0 else f"summary-{i}")
        table.caption = f"Hardware profile {hw}" if many else ""
        tables.append(table)
    return [Part("Summary", text=text, tables=tables)]
