"""Empirical scaling exponents: the slope of log(latency) against log(context length).

A method's claim (linear time, constant-time decode) is a claim about this
slope: ~1 for a linear-time forward, ~2 for exact attention once the N^2 term
dominates, ~0 for a recurrent decode step and ~1 for a KV-cache one. Short
contexts are dominated by launch and fixed costs, so the fit uses only lengths
>= 1024 by default.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

__all__ = ["DEFAULT_MIN_LEN", "GROUP_KEYS", "fit_loglog_slope", "scaling_slopes"]

DEFAULT_MIN_LEN = 1024
# One fit per curve: everything that identifies a row except the length swept along x.
GROUP_KEYS = ("method", "impl", "pattern", "mode", "dtype", "batch", "heads", "head_dim", "input_dist", "method_params")


def fit_loglog_slope(seq_lens: Sequence[float], latencies: Sequence[float]) -> float:
    """Least-squares slope of log(latency) on log(length): latency ~ c * length^slope.

    Raises ValueError on fewer than two distinct lengths or non-positive values (the log is undefined).
    """
    x = np.asarray(seq_lens, dtype=float)
    y = np.asarray(latencies, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"seq_lens and latencies must be 1-D and equally long, got {x.shape} and {y.shape}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))) or np.any(x <= 0) or np.any(y <= 0):
        raise ValueError("seq_lens and latencies must be finite and > 0 for a log-log fit")
    if np.unique(x).size < 2:
        raise ValueError(f"a slope needs at least two distinct lengths, got {np.unique(x).tolist()}")
    slope, _ = np.polyfit(np.log(x), np.log(y), 1)
    return float(slope)


def _pattern(row: pd.Series) -> str:
    """CAB's pattern of a row: causal or not, and cross when queries and keys differ (decode is its own mode)."""
    base = "causal" if bool(row["causal"]) else "non-causal"
    return f"{base}-cross" if row["mode"] != "decode" and row["seq_len"] != row["kv_len"] else base


def scaling_slopes(df: pd.DataFrame, min_len: int = DEFAULT_MIN_LEN, max_len: int | None = None) -> pd.DataFrame:
    """One slope per curve of the `scaling` task: x = kv_len, y = latency_ms, over kv_len in [min_len, max_len].

    Only `ok` rows that were not run under Triton's interpreter count. Curves
    are grouped by method, impl, pattern, mode and dtype, and by the shape and
    parameters held fixed along the curve (batch, heads, head_dim, input_dist,
    method_params, where present), so a sweep over head dims gives one slope
    per head dim rather than a fit through two curves. Repeated rows of one
    length (re-runs) count once, at their median latency.

    Returns one row per curve with `slope` (NaN when fewer than two lengths are
    left), `n_lengths`, `min_kv_len`, `max_kv_len`.
    """
    columns = [*GROUP_KEYS, "slope", "n_lengths", "min_kv_len", "max_kv_len"]
    if df.empty:
        return pd.DataFrame(columns=columns)
    rows = df
    if "task" in rows.columns:
        rows = rows[rows["task"] == "scaling"]
    rows = rows[rows["status"] == "ok"]
    if "interpreted" in rows.columns:
        rows = rows[~rows["interpreted"].fillna(False).astype(bool)]
    rows = rows[rows["latency_ms"].notna() & (rows["latency_ms"] > 0)]
    rows = rows[rows["kv_len"] >= min_len]
    if max_len is not None:
        rows = rows[rows["kv_len"] <= max_len]
    if rows.empty:
        return pd.DataFrame(columns=columns)
    rows = rows.assign(pattern=rows.apply(_pattern, axis=1))
    keys = [k for k in GROUP_KEYS if k in rows.columns]
    # Missing values (e.g. no method_params) must not drop a group: fill them with a marker for grouping.
    rows[keys] = rows[keys].astype(object).where(rows[keys].notna(), "")
    out = []
    for group, curve in rows.groupby(keys, sort=True, dropna=False):
        per_len = curve.groupby("kv_len")["latency_ms"].median()
        slope = fit_loglog_slope(per_len.index, per_len.values) if len(per_len) >= 2 else float("nan")
        record = dict(zip(keys, group if isinstance(group, tuple) else (group,), strict=True))
        record.update(
            slope=slope,
            n_lengths=len(per_len),
            min_kv_len=int(per_len.index.min()),
            max_kv_len=int(per_len.index.max()),
        )
        out.append(record)
    return pd.DataFrame(out, columns=[c for c in columns if c in keys or c not in GROUP_KEYS])
