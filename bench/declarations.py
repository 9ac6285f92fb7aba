"""What the rows say about themselves: their key columns and their metric declarations.

Rows written since schema 2 carry both (`keys`, `metrics`), so a results folder
read years later, without the code that wrote it, still says which columns
identify a cell and which are measurements (unit, better direction, how compare
judges them). Rows of schema 1 carry neither; for those the task registry's
declaration for the row's task stands in. Nothing here names a task.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

import numpy as np
import pandas as pd

from tasks import TASKS
from tasks.base import SHAPE_KEYS

IDENTITY = ("method", "impl", "task")  # what every cell is keyed by before its declared keys


def _registry_keys(task: str) -> list[str]:
    spec = TASKS.get(task)
    return [*SHAPE_KEYS, *(spec.keys if spec else ()), "method_params"]


def _registry_metrics(task: str) -> list[dict]:
    spec = TASKS.get(task)
    return spec.declarations() if spec else []


def _is_list(v: object) -> bool:
    return isinstance(v, list | tuple | np.ndarray)


def _distinct_lists(values: Iterable) -> list[tuple[str, ...]]:
    """The distinct key lists of a column (lists are unhashable, so pandas cannot drop their duplicates).

    Joined into one text per row first (C speed): the report asks this of 10,000 rows for every table.
    """
    joined = dict.fromkeys("\x1f".join(map(str, v)) for v in values if _is_list(v))
    return [tuple(text.split("\x1f")) if text else () for text in joined]


def key_columns(*frames: pd.DataFrame) -> list[str]:
    """IDENTITY, then every column any row names as a key, in first-seen order (shape columns first)."""
    keys: list[str] = list(IDENTITY)
    for df in frames:
        if df.empty:
            continue
        declared = df["keys"] if "keys" in df.columns else pd.Series([None] * len(df), index=df.index)
        for names in _distinct_lists(declared):
            keys.extend(n for n in names if n not in keys)
        undeclared = df.loc[~declared.map(_is_list), "task"]
        for task in undeclared.dropna().astype(str).unique():
            keys.extend(n for n in _registry_keys(task) if n not in keys)
    return keys


def metric_declarations(*frames: pd.DataFrame) -> dict[str, dict]:
    """name -> {name, unit, better, judge, label, headline, task}: every metric any row declares.

    The first declaration of a name wins; `task` is the task that declared it (a headline is per task).
    """
    found: dict[str, dict] = {}
    for df in frames:
        if df.empty:
            continue
        metrics = df["metrics"] if "metrics" in df.columns else pd.Series([None] * len(df), index=df.index)
        pairs = pd.DataFrame({"task": df["task"].astype(str), "metrics": metrics}).drop_duplicates()
        for task, text in zip(pairs["task"], pairs["metrics"], strict=True):
            declared = json.loads(text) if isinstance(text, str) and text else _registry_metrics(task)
            for m in declared:
                found.setdefault(m["name"], {**m, "task": task})
    return found
