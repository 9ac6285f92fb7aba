"""Quality-against-cost Pareto fronts, one figure per task: which methods are worth their latency.

Quality per task: needle = mean hit rate over depths and lengths; mqar =
best accuracy (cost: training seconds where latency is absent); scaling =
fidelity error against the fp64 oracle at the longest common context (lower is
better). A point is on the front when no other point is both cheaper and at
least as good; the front is drawn as a step line and its points are filled.
Compiled rows only: an interpreted kernel's latency is not a cost.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def pareto_mask(cost: np.ndarray, quality: np.ndarray) -> np.ndarray:
    """True where no other point has cost <= and quality >= with one strictly better (minimise cost, maximise q)."""
    cost, quality = np.asarray(cost, float), np.asarray(quality, float)
    better_or_eq = (cost[None, :] <= cost[:, None]) & (quality[None, :] >= quality[:, None])
    strictly = (cost[None, :] < cost[:, None]) | (quality[None, :] > quality[:, None])
    return ~(better_or_eq & strictly).any(axis=1)


def task_points(df: pd.DataFrame, task: str) -> tuple[pd.DataFrame, str, str, bool]:
    """(points with method label, cost, quality; cost axis label, quality axis label, higher quality is better)."""
    rows = df[(df["task"] == task) & df["status"].eq("ok")]
    if "interpreted" in rows.columns:
        rows = rows[~rows["interpreted"].fillna(False).astype(bool)]
    label = rows["method"].astype(str) + "/" + rows["impl"].astype(str)
    rows = rows.assign(_label=label)
    if task == "scaling":
        rows = rows[rows["fidelity_rel"].notna() & rows["latency_ms"].notna()]
        if rows.empty:
            return pd.DataFrame(), "", "", True
        common = rows.groupby(["_pattern", "_mode", "_dtype"]).size().idxmax()
        rows = rows[(rows["_pattern"] == common[0]) & (rows["_mode"] == common[1]) & (rows["_dtype"] == common[2])]
        rows = rows[rows["kv_len"] == rows["kv_len"].max()]
        pts = rows.groupby("_label").agg(cost=("latency_ms", "median"), quality=("fidelity_rel", "median"))
        ctx = f"{common[0]} {common[1]} {common[2]}, kv_len={int(rows['kv_len'].max())}"
        return pts.reset_index(), f"latency (ms), {ctx}", "relative error vs fp64 oracle (lower is better)", False
    quality_col = "accuracy"
    cost_col = "latency_ms"
    if task == "mqar":
        from bench.mqar_report import best_per_size

        best = best_per_size(rows)
        if best.empty:
            return pd.DataFrame(), "", "", True
        best = best.assign(_label=best["method"].astype(str) + "/" + best["impl"].astype(str))
        pts = best.groupby("_label").agg(cost=("train_seconds", "median"), quality=("accuracy", "max"))
        return pts.reset_index(), "training time (s)", "MQAR accuracy (best lr)", True
    rows = rows[rows[quality_col].notna() & rows[cost_col].notna()]
    if rows.empty:
        return pd.DataFrame(), "", "", True
    pts = rows.groupby("_label").agg(cost=(cost_col, "mean"), quality=(quality_col, "mean"))
    qname = "mean hit rate (depths × lengths)" if task == "needle" else quality_col
    return pts.reset_index(), "mean latency (ms)", qname, True


def pareto_plot(df: pd.DataFrame, task: str, path: Path) -> Path | None:
    """Scatter of quality against cost for one task, the Pareto front highlighted; None when < 2 points."""
    pts, xlabel, ylabel, higher = task_points(df, task)
    pts = pts.dropna() if not pts.empty else pts
    if len(pts) < 2:
        return None
    quality = pts["quality"].to_numpy(float) * (1 if higher else -1)
    front = pareto_mask(pts["cost"].to_numpy(float), quality)
    fig = Figure(figsize=(4.5, 3.4), dpi=150)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.scatter(pts.loc[~front, "cost"], pts.loc[~front, "quality"], s=14, facecolors="none", edgecolors="grey")
    on = pts[front].sort_values("cost")
    ax.step(on["cost"], on["quality"], where="post", color="C3", linewidth=1.2)
    ax.scatter(on["cost"], on["quality"], s=18, color="C3", zorder=3)
    for _, r in on.iterrows():
        ax.annotate(r["_label"], (r["cost"], r["quality"]), fontsize=5.5, xytext=(3, 2), textcoords="offset points")
    ax.set_xscale("log")
    if not higher and (pts["quality"] > 0).all():
        ax.set_yscale("log")
        ax.invert_yaxis()  # better is up, as in the other tasks' fronts
    ax.set_xlabel(xlabel, fontsize=7)
    ax.set_ylabel(ylabel, fontsize=7)
    ax.tick_params(labelsize=6)
    ax.grid(True, alpha=0.3)
    ax.set_title(f"{task}: quality vs cost (red: Pareto front, {int(front.sum())} of {len(pts)})", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return path
