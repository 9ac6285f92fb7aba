"""Empirical scaling exponents: the slope of log(latency) against log(context length).

A method's claim (linear time, constant-time decode) is a claim about this
slope: ~1 for a linear-time forward, ~2 for exact attention once the N^2 term
dominates, ~0 for a recurrent decode step and ~1 for a KV-cache one. Short
contexts are dominated by launch and fixed costs, so the fit uses only lengths
>= 1024 by default.

A curve is one method/impl at one pattern and one value of every other key the
rows declare (mode, dtype, B×H×D, method parameters, a task's own keys): only
the context length moves along it. Rows come from the tasks that declare they
are drawn against the context length (`Task.plots_vs_context`). A curve with a
row the interference probe found disturbed is `disturbed` (its latency slope is
marked †); memory curves never are: memory is measured without the clock.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from bench.disturbed import MARK, disturbed_mask, is_timing_metric
from bench.report.document import Part, Table
from bench.report.format import DISTURBED_NOTE, PARAMS, is_cross, marked, point_text, varies
from bench.report.rows import context_rows, row_keys

__all__ = ["DEFAULT_MIN_LEN", "curve_rows", "fit_curves", "fit_loglog_slope", "scaling_slopes", "slopes_part"]

DEFAULT_MIN_LEN = 1024
ALONG = ("seq_len", "kv_len", "causal")  # the length moves along a curve; causal is part of its pattern
HEADED = ("method", "impl", "pattern", "mode", "dtype")  # curve columns a table shows on their own


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


def cab_pattern(rows: pd.DataFrame) -> pd.Series:
    """CAB's pattern of each row: causal or not, '-cross' when queries and keys differ (decode is its own mode)."""
    base = rows["causal"].map(lambda c: "causal" if bool(c) else "non-causal")
    return base.where(~is_cross(rows), base + "-cross")


def curve_rows(
    df: pd.DataFrame, metric: str, min_len: int, max_len: int | None = None
) -> tuple[pd.DataFrame, list[str]]:
    """(the rows that make curves of `metric`, with `pattern`; the columns that name a curve).

    Ok, compiled rows of tasks drawn against the context length, with a positive
    value and kv_len in [min_len, max_len]. Missing key values are filled with ""
    so that a row without a key (e.g. no method parameters) still makes a curve.
    `_disturbed`: the row's value of `metric` comes from a clock the probe found disturbed.
    """
    if df.empty or metric not in df.columns:
        return pd.DataFrame(), []
    rows = context_rows(df)
    values = pd.to_numeric(rows[metric], errors="coerce")
    rows = rows[values.notna() & (values > 0) & rows["kv_len"].notna() & (rows["kv_len"] >= max(min_len, 1))]
    if max_len is not None:
        rows = rows[rows["kv_len"] <= max_len]
    if rows.empty:
        return pd.DataFrame(), []
    rows = rows.assign(pattern=cab_pattern(rows), _disturbed=disturbed_mask(rows) & is_timing_metric(metric))
    keys = ["method", "impl", "pattern", *(k for k in row_keys(rows) if k not in ALONG and k in rows.columns)]
    keys = sorted(keys, key=lambda k: HEADED.index(k) if k in HEADED else len(HEADED))
    rows[keys] = rows[keys].astype(object).where(rows[keys].notna(), "")
    return rows, keys


def fit_curves(
    df: pd.DataFrame, metric: str, min_len: int, max_len: int | None = None
) -> tuple[pd.DataFrame, list[str]]:
    """(one row per curve: its columns, the fit cost = a * N^k, `n_lengths`, `min_kv_len`, `max_kv_len`,
    `disturbed` (a row of the curve was disturbed, see `curve_rows`); the curve columns).

    Least squares of log(median cost per length) on log(length), vectorised over
    every curve at once (a groupby per curve takes minutes at 10k rows). Repeated
    rows of one length (re-runs) count once, at their median. `k` and `a` are NaN
    for a curve with fewer than two lengths.
    """
    rows, keys = curve_rows(df, metric, min_len, max_len)
    if rows.empty:
        return pd.DataFrame(), []
    per_len = rows.groupby([*keys, "kv_len"], sort=True).agg(**{metric: (metric, "median"),
                                                                 "_disturbed": ("_disturbed", "any")}).reset_index()  # fmt: skip
    x, y = np.log(per_len["kv_len"].astype(float)), np.log(per_len[metric].astype(float))
    per_len = per_len.assign(x=x, y=y, xx=x**2, xy=x * y)
    g = per_len.groupby(keys, sort=True).agg(
        n_lengths=("x", "size"), sx=("x", "sum"), sy=("y", "sum"), sxx=("xx", "sum"), sxy=("xy", "sum"),
        min_kv_len=("kv_len", "min"), max_kv_len=("kv_len", "max"), disturbed=("_disturbed", "any"),
    )  # fmt: skip
    denom = g["n_lengths"] * g["sxx"] - g["sx"] ** 2
    fitted = (g["n_lengths"] >= 2) & (denom > 0)
    k = ((g["n_lengths"] * g["sxy"] - g["sx"] * g["sy"]) / denom).where(fitted)
    out = g.assign(k=k, a=np.exp((g["sy"] - k * g["sx"]) / g["n_lengths"])).reset_index()
    out[["min_kv_len", "max_kv_len"]] = out[["min_kv_len", "max_kv_len"]].astype(int)
    out["disturbed"] = out["disturbed"].astype(bool)
    return out[[*keys, "a", "k", "n_lengths", "min_kv_len", "max_kv_len", "disturbed"]], keys


def scaling_slopes(df: pd.DataFrame, min_len: int = DEFAULT_MIN_LEN, max_len: int | None = None) -> pd.DataFrame:
    """One slope per curve: x = kv_len, y = latency_ms, over kv_len in [min_len, max_len].

    Returns one row per curve: its key columns, `slope` (NaN when fewer than two
    lengths are left), `n_lengths`, `min_kv_len`, `max_kv_len`, `disturbed`.
    """
    results = ["slope", "n_lengths", "min_kv_len", "max_kv_len", "disturbed"]
    curves, keys = fit_curves(df, "latency_ms", min_len, max_len)
    if curves.empty:
        return pd.DataFrame(columns=["method", "impl", "pattern", *results])
    return curves.rename(columns={"k": "slope"})[[*keys, *results]]


def curve_cells(curves: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """(method, impl, pattern, mode, dtype and a 'point' column of the other curve keys that vary; caption).

    Keys with one value over all curves go in the caption; method parameters
    only where one method ran with several sets (`format.params_text`).
    """
    results = {"slope", "n_lengths", "min_kv_len", "max_kv_len", "metric", "baseline_slope", "efficiency_length",
               "meaning", "extrapolated", "disturbed"}  # fmt: skip
    headed = [c for c in HEADED if c in curves.columns]
    other = [c for c in curves.columns if c not in results and c not in headed]
    varying = [c for c in other if varies(curves, c)]
    constant = [c for c in other if c not in varying and c != PARAMS]
    cells = curves[headed].astype(str)
    if varying:
        cells["point"] = point_text(curves, varying)
    caption = point_text(curves.iloc[:1], constant, sep=", ").iloc[0] if constant and len(curves) else ""
    return cells, (f"All curves: {caption}." if caption else "")


def slopes_part(df: pd.DataFrame) -> Part | None:
    """The empirical exponent of latency in context length per curve; None when no curve has two lengths."""
    slopes = scaling_slopes(df)
    slopes = slopes[slopes["slope"].notna()] if not slopes.empty else slopes
    if slopes.empty:
        return None
    slopes = slopes.sort_values([c for c in slopes.columns if c in HEADED]).reset_index(drop=True)
    cells, caption = curve_cells(slopes)
    cells["slope"] = marked(slopes["slope"].map(lambda x: f"{x:.2f}"), slopes["disturbed"])
    cells["lengths"] = slopes["min_kv_len"].astype(str) + "–" + slopes["max_kv_len"].astype(str)
    cells["points"] = slopes["n_lengths"].astype(str)
    text = (f"Least-squares slope of log(latency) against log(context length), lengths >= {DEFAULT_MIN_LEN}: about 1 "
            "for a linear-time method, 2 for exact attention once N² dominates, 0 for a recurrent decode step.")  # fmt: skip
    sort_keys = pd.DataFrame({"slope": slopes["slope"], "points": slopes["n_lengths"]})
    note = DISTURBED_NOTE + f" Here {MARK} marks a slope fitted through such a row." if slopes["disturbed"].any() else ""
    return Part("Scaling slopes", text=[text],
                tables=[Table(cells, caption=caption, sort_keys=sort_keys, numeric=("slope", "points"), note=note)])  # fmt: skip
