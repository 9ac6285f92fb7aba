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
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from bench.report.document import Part, Table
from bench.report.format import MISSING, fmt_metric, metric_header
from bench.report.rows import row_metrics
from tasks import TASKS
from tasks.base import SummaryColumn, headline_mean

RULE = (
    "Ranked by mean rank: each column ranks the rows that have a value in it, in its metric's direction "
    "(↑ higher is better, ↓ lower is better; ties share the best rank); a row's score is the mean of its ranks over "
    "the columns it has values for (ties: more columns first, then by name)."
)
INDEX = ["method", "impl"]


@dataclass
class TaskSummary:
    """One task's summary columns on one hardware profile (table columns and Pareto-only ones alike)."""

    task: str
    hardware: str
    columns: list[SummaryColumn]


def default_columns(task: str, ok: pd.DataFrame) -> list[SummaryColumn]:
    """For a task the registry does not know: its declared headline's mean per (method, impl)."""
    metrics, headline = row_metrics(ok)
    metric = next((m for m in metrics if m.name == headline), None)
    return [] if metric is None else headline_mean(metric, ok)


def summarise(df: pd.DataFrame) -> tuple[list[TaskSummary], list[str]]:
    """Every task's summary columns per hardware profile from the ok, compiled rows; notes on tasks that gave none.

    A task whose `summary` fails (rows of an older version of the task may lack a column it reads) gets a note
    naming the error instead of silently missing from the table.
    """
    ok = df[df["status"].eq("ok") & ~df["_interp"]]
    out, notes = [], []
    for (hw, task), rows in ok.groupby(["_hw", "_task"], sort=True):
        try:
            columns = TASKS[task].summary(rows) if task in TASKS else default_columns(task, rows)
        except Exception as err:  # a task's code on old rows: report it, keep the rest of the summary
            notes.append(f"{task}: no summary column ({type(err).__name__}: {err})".splitlines()[0])
            continue
        if columns:
            out.append(TaskSummary(task, hw, columns))
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
        sort_keys[header] = values[i].to_numpy()
    mean_rank = ranked["mean_rank"].reset_index(drop=True)
    cells["mean rank"] = mean_rank.map(lambda r: MISSING if pd.isna(r) else f"{r:.2f}")
    sort_keys["mean rank"] = mean_rank
    return Table(cells, id=table_id, sort_keys=sort_keys, numeric=("#", *headers, "mean rank"))


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
