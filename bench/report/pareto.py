"""Quality-against-cost Pareto fronts, one figure per task that declares its axes: which methods are worth their cost.

A task declares `pareto = (cost metric, quality metric)`; the points are its
summary columns of those metrics (one value per method and impl, at the point
the task states), so the figure and the summary table show the same numbers.
Which way is better comes from each metric's declaration. A point is on the
front when no other point is both cheaper and at least as good; the front is
drawn as a step line and its points are filled. Compiled rows only (the summary
leaves interpreted kernels out). A point whose cost or quality rests on a row the
interference probe found disturbed (the summary's marks) gets a black diamond
around it and a legend entry: its position on the cost axis is not to be trusted.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.layout_engine import TightLayoutEngine

from bench.disturbed import LABEL
from bench.report.format import file_slug
from bench.report.summary import TaskSummary
from tasks import TASKS
from tasks.base import SummaryColumn


def pareto_mask(cost: np.ndarray, quality: np.ndarray) -> np.ndarray:
    """True where no other point has cost <= and quality >= with one strictly better (minimise cost, maximise q)."""
    cost, quality = np.asarray(cost, float), np.asarray(quality, float)
    better_or_eq = (cost[None, :] <= cost[:, None]) & (quality[None, :] >= quality[:, None])
    strictly = (cost[None, :] < cost[:, None]) | (quality[None, :] > quality[:, None])
    return ~(better_or_eq & strictly).any(axis=1)


def axis_column(columns: list[SummaryColumn], metric: str) -> SummaryColumn | None:
    """The task's first summary column of that metric (the task orders its columns, most telling first)."""
    return next((c for c in columns if c.metric.name == metric), None)


def pareto_points(summary: TaskSummary) -> tuple[pd.DataFrame, SummaryColumn | None, SummaryColumn | None]:
    """(points: label, cost, quality; the cost column; the quality column); no points without declared axes."""
    task = TASKS.get(summary.task)
    if task is None or not task.pareto:
        return pd.DataFrame(), None, None
    cost, quality = (axis_column(summary.columns, name) for name in task.pareto)
    if cost is None or quality is None:
        return pd.DataFrame(), cost, quality
    pts = pd.concat([cost.values.rename("cost"), quality.values.rename("quality")], axis=1, join="inner")
    pts = pts.apply(pd.to_numeric, errors="coerce").dropna()
    labels = ["/".join(str(x) for x in ix) if isinstance(ix, tuple) else str(ix) for ix in pts.index]
    marks = column_marks(summary, cost) | column_marks(summary, quality)
    disturbed = [tuple(str(x) for x in ix) in marks if isinstance(ix, tuple) else False for ix in pts.index]
    return pts.reset_index(drop=True).assign(_label=labels, _disturbed=disturbed), cost, quality


def column_marks(summary: TaskSummary, column: SummaryColumn) -> set[tuple[str, str]]:
    """The (method, impl) whose value in this column rests on a disturbed row (by identity: columns hold Series)."""
    return next((summary.marked(i) for i, c in enumerate(summary.columns) if c is column), set())


def axis_label(column: SummaryColumn) -> str:
    """The axis in the metric's declared unit (the values are drawn as declared, not converted)."""
    return column.metric.header + (f"\n@ {column.where}" if column.where else "")


def pareto_plot(summary: TaskSummary, path: Path) -> Path | None:
    """Scatter of quality against cost for one task, the Pareto front highlighted, saved; None when < 2 points."""
    fig = pareto_figure(summary)
    if fig is None:
        return None
    fig.savefig(path)
    return path


def pareto_figure(summary: TaskSummary) -> Figure | None:
    """The Pareto figure of one task (not saved, so a test can read its artists); None when < 2 points."""
    pts, cost, quality = pareto_points(summary)
    if len(pts) < 2 or cost is None or quality is None:
        return None
    sign_c = -1.0 if cost.metric.better == "higher" else 1.0
    sign_q = -1.0 if quality.metric.better == "lower" else 1.0
    front = pareto_mask(sign_c * pts["cost"].to_numpy(float), sign_q * pts["quality"].to_numpy(float))
    fig = Figure(figsize=(4.5, 3.4), dpi=150)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.scatter(pts.loc[~front, "cost"], pts.loc[~front, "quality"], s=14, facecolors="none", edgecolors="grey")
    on = pts[front].sort_values("cost", ascending=sign_c > 0)
    ax.step(on["cost"], on["quality"], where="post", color="C3", linewidth=1.2)
    ax.scatter(on["cost"], on["quality"], s=18, color="C3", zorder=3)
    for _, r in on.iterrows():
        ax.annotate(r["_label"], (r["cost"], r["quality"]), fontsize=5.5, xytext=(3, 2), textcoords="offset points")
    hit = pts[pts["_disturbed"]]
    if not hit.empty:
        ax.scatter(hit["cost"], hit["quality"], s=48, marker="D", facecolors="none", edgecolors="black",
                   linewidths=0.8, zorder=4, label=LABEL, gid="disturbed")  # fmt: skip
        ax.legend(fontsize=6, loc="best", frameon=False)
    if (pts["cost"] > 0).all():
        ax.set_xscale("log")
    if sign_q < 0 and (pts["quality"] > 0).all():
        ax.set_yscale("log")
        ax.invert_yaxis()  # better is up, whichever way the metric runs
    ax.set_xlabel(axis_label(cost), fontsize=6.5)
    ax.set_ylabel(axis_label(quality), fontsize=6.5)
    ax.tick_params(labelsize=6)
    ax.grid(True, alpha=0.3)
    ax.set_title(f"{summary.task}: quality vs cost (red: Pareto front, {int(front.sum())} of {len(pts)})", fontsize=8)
    TightLayoutEngine().execute(fig)  # fig.tight_layout() without leaving an engine that savefig would redo
    return fig


def pareto_plots(summaries: list[TaskSummary], out: Path) -> list[Path]:
    """`pareto_<task>.png` per task with declared axes (`pareto_<task>_<hardware>.png` when profiles differ)."""
    many_hw = len({s.hardware for s in summaries}) > 1
    paths = []
    for s in summaries:
        name = f"pareto_{file_slug(s.task)}" + (f"_{file_slug(s.hardware)}" if many_hw else "") + ".png"
        if (p := pareto_plot(s, out / name)) is not None:
            paths.append(p)
    return paths
