"""The rows the report reads: loading (unreadable files kept as findings), grouping columns, and what rows declare.

Which columns identify a cell and which are metrics is never guessed: rows of
schema 2 name their key columns (`keys`) and declare their metrics (`metrics`);
rows of schema 1 get their task's registered declaration (`bench.declarations`).
Which tasks are drawn against the context length is the task's own
declaration (`plots_vs_context`); a task this code does not know is not.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pandas as pd

from bench.declarations import IDENTITY, key_columns, metric_declarations
from bench.report.format import MISSING, is_cross
from bench.results import load
from tasks import TASKS
from tasks.base import Metric

METRIC_FIELDS = ("name", "unit", "better", "judge", "label")
GROUPING = ("interpreted", "dtype", "batch", "heads", "seq_len", "kv_len", "head_dim", "causal", "mode")


class NoResults(SystemExit):
    """Nothing to report on. A SystemExit so a script stops with the one-line message, not a traceback."""


def load_results(results_dir: Path) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """Every readable row, plus (file, reason) for each unreadable file: one bad file must not hide the rest."""
    if not results_dir.exists():
        raise NoResults(f"no results at {results_dir}: the folder does not exist")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        df = load(results_dir, on_corrupt="warn")
    corrupt = []
    for w in caught:
        if "results file" in str(w.message):
            corrupt.append(parse_corrupt(str(w.message), results_dir))
        else:
            warnings.warn(w.message, w.category, stacklevel=2)
    if df.empty:
        extra = f" ({len(corrupt)} unreadable results files)" if corrupt else ""
        raise NoResults(f"no result rows under {results_dir}{extra}: run `python -m bench.run` first")
    return df, corrupt


def parse_corrupt(message: str, results_dir: Path) -> tuple[str, str]:
    """(file, reason) from a `CorruptResults` message; the file relative to the results folder when it can be."""
    m = re.match(r"corrupt results file (.+?): (.*)$", message) or re.match(r"results file (.+?) (has .*)$", message)
    if not m:
        return MISSING, message
    file = m.group(1)
    try:
        file = str(Path(file).relative_to(results_dir))
    except ValueError:
        pass
    return file, m.group(2)


def pattern_labels(df: pd.DataFrame) -> pd.Series:
    """'causal self', 'non-causal cross', ...: decode (one query against a cache) counts as self."""
    causal = pd.Series("", index=df.index, dtype=object)
    causal[df["causal"].eq(True)] = "causal"
    causal[df["causal"].eq(False)] = "non-causal"
    kind = pd.Series("", index=df.index, dtype=object)
    kind[df["seq_len"].notna() & df["kv_len"].notna()] = "self"
    kind[is_cross(df)] = "cross"
    label = (causal + " " + kind).str.strip()
    return label.where(label != "", "any")


def prepare(df: pd.DataFrame) -> pd.DataFrame:
    """The frame with the grouping columns the tables and plots share, as plain strings (no NaN keys).

    Added columns start with "_" (_pattern, _interp, _hw, _task, _mode, _dtype, _context).
    """
    df = df.copy()
    for col in GROUPING:
        if col not in df.columns:
            df[col] = None
    df["_pattern"] = pattern_labels(df)
    df["_interp"] = df["interpreted"].eq(True)
    for src, dst in (("hardware", "_hw"), ("task", "_task"), ("mode", "_mode"), ("dtype", "_dtype")):
        df[dst] = df[src].astype(object).where(df[src].notna(), "").astype(str)
    df["_context"] = plots_vs_context(df["_task"])
    return df


def plots_vs_context(tasks: pd.Series) -> pd.Series:
    """True for rows of tasks that declare their latency and memory are drawn against the context length."""
    declared = {name: bool(TASKS[name].plots_vs_context) for name in tasks.dropna().unique() if name in TASKS}
    return tasks.map(declared).fillna(False).astype(bool)


def context_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The rows the context-length views (plots, slopes, efficiency length) use: ok, compiled, of such tasks.

    One mask, one copy at most (none when every row qualifies): at 10k wide rows each copy costs a second.
    """
    keep = df["status"].eq("ok")
    if "_context" in df.columns:
        keep &= df["_context"]
    elif "task" in df.columns:
        keep &= plots_vs_context(df["task"])
    if "interpreted" in df.columns:
        keep &= ~df["interpreted"].fillna(False).astype(bool)
    return df if keep.all() else df[keep]


def row_keys(df: pd.DataFrame) -> list[str]:
    """The key columns of these rows besides method, impl and task: the union of what they declare, in order."""
    return [k for k in key_columns(df) if k not in IDENTITY]


def row_metrics(df: pd.DataFrame) -> tuple[list[Metric], str | None]:
    """(the metrics these rows declare, in declared order; the headline metric's name, if one is declared)."""
    declared = metric_declarations(df)
    metrics = [Metric(**{f: d.get(f) or ("" if f in ("unit", "label") else None) for f in METRIC_FIELDS})
               for d in declared.values()]  # fmt: skip
    headline = next((d["name"] for d in declared.values() if d.get("headline")), None)
    return metrics, headline
