"""Latency, memory and % of peak against the context length (log-log), for the tasks that declare it.

Only rows of tasks with `plots_vs_context` are drawn: other tasks vary other
keys at one context and would draw zig-zag lines. Never interpreted rows. One
figure per task, hardware and dtype; a panel per (pattern, mode); a line per
method/impl. A figure draws the subset of the remaining keys (B×H×D and other
varying keys) with most rows; the other subsets are in the tables. Timing figures
(latency, % of peak) draw a point whose row the interference probe found disturbed
hollow, with a legend entry: it is shown, not hidden, but not to be trusted. The
memory figure marks nothing: memory is measured without the clock.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, NullLocator

import bench.report.background as background
from bench.disturbed import LABEL, disturbed_mask, is_timing_metric
from bench.report.document import Part
from bench.report.format import (
    DEFAULTS,
    MIB,
    PARAMS,
    SHAPE_TRIPLE,
    file_slug,
    fmt_value,
    params_text,
    point_text,
    varies,
)
from bench.report.rows import context_rows, prepare, row_keys
from bench.report.tables import pattern_mode_order
from tasks.base import SHAPE_KEYS

LATENCY_PNG = "latency_vs_seq_len.png"
MEMORY_PNG = "memory_vs_seq_len.png"
PEAK_PNG = "pct_peak_vs_seq_len.png"
MAX_EXTRA_FIGURES = 12  # per metric: a cap on files when results span many task/hardware/dtype combinations
LEGEND_COLUMNS = 3
TOP_IN = 0.85  # inches above the panels: the two-line figure title and the panel titles
# The measured columns these figures draw (core columns of every timed row): title and y axis label.
METRIC_AXES = {
    "latency_ms": ("Latency (median; bars p10–p90)", "latency (ms)"),
    "peak_mem_bytes": ("Peak memory", "peak memory (MiB)"),
    "pct_peak": ("Share of the hardware's peak FLOP/s", "% of peak"),
}


def plot_data(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    """The rows a metric-vs-context plot may show: ok, compiled, of a task drawn against context, with the metric.

    Each row gets `_line` (the legend label), `_figure` (task · hardware · dtype:
    one file each), `_subset` (the rest of the point: one figure draws one
    subset) and `_disturbed` (a timing value of a row the probe found disturbed).
    Duplicates of a point keep the latest row.
    """
    if "_pattern" not in df.columns:
        df = prepare(df)
    sel = context_rows(df)
    sel = sel[sel[metric].notna() & sel["kv_len"].notna() & sel["kv_len"].gt(0)].copy()
    if sel.empty:
        for col in ("_line", "_figure", "_subset"):
            sel[col] = pd.Series(dtype=str)
        sel["_disturbed"] = pd.Series(dtype=bool)
        return sel
    sel["_disturbed"] = disturbed_mask(sel) & is_timing_metric(metric)
    # Parameters name a line only where one method was run with several parameter sets.
    line = (
        sel["method"].astype(str) + "/" + sel["impl"].astype(str) + params_text(sel).map(lambda p: f" {p}" if p else "")
    )
    is_cross = sel["_pattern"].str.endswith("cross")
    sel["_line"] = line + sel["seq_len"].map(lambda v: "" if pd.isna(v) else f" (q={int(v)})").where(is_cross, "")
    figure_cols = [c for c in ("_task", "_hw", "_dtype") if c != "_hw" or sel["_hw"].nunique() > 1]
    sel["_figure"] = joined_labels(sel, figure_cols)
    other = [k for k in row_keys(sel) if k not in SHAPE_KEYS and k != PARAMS and varies(sel, k)]
    sel["_subset"] = point_text(sel, [*SHAPE_TRIPLE, *other])
    if "timestamp" in sel.columns:
        sel = sel.sort_values("timestamp", kind="stable", na_position="first")
    return sel.drop_duplicates(["_figure", "_subset", "_pattern", "_mode", "_line", "kv_len"], keep="last")


def joined_labels(df: pd.DataFrame, cols: list[str]) -> pd.Series:
    """'mytask · float16': the values of derived grouping columns, joined."""
    joined = pd.Series("", index=df.index, dtype=object)
    for col in cols:
        joined = joined + " · " + df[col].map(lambda v: "" if fmt_value(v) in DEFAULTS else fmt_value(v))
    return joined.str.replace(r"( · )+", " · ", regex=True).str.strip(" ·")


def figure_rows(data: pd.DataFrame) -> list[tuple[str, str, pd.DataFrame]]:
    """(figure label, title, rows) per figure, the one with most rows first (it gets the main file name)."""
    if data.empty:
        return []
    sizes = data.groupby(["_figure", "_subset"], sort=True).size().rename("n").reset_index()
    best = sizes.sort_values("n", ascending=False, kind="stable").drop_duplicates("_figure")
    out = []
    for figure, subset in zip(best["_figure"], best["_subset"], strict=True):
        rows = data[(data["_figure"] == figure) & (data["_subset"] == subset)]
        out.append((figure, f"{figure} · {subset}".strip(" ·"), rows))
    return out


def panel_order(data: pd.DataFrame) -> list[tuple[str, str]]:
    """(pattern, mode) panels in reading order."""
    pairs = data[["_pattern", "_mode"]].drop_duplicates().itertuples(index=False)
    return sorted(pairs, key=lambda pm: pattern_mode_order(pm[0], pm[1]))


def kv_ticks(x: float, _pos: int) -> str:
    """Context lengths as 512, 4k, 1M: powers of two read badly in full."""
    if x >= 2**20 and x % 2**20 == 0:
        return f"{int(x) // 2**20}M"
    if x >= 1024 and x % 1024 == 0:
        return f"{int(x) // 1024}k"
    return f"{x:g}"


def line_styles(lines: Sequence[str]) -> dict[str, tuple[str, str]]:
    """A fixed (colour, marker) per line, the same in every panel and both figures."""
    colors = [f"C{i}" for i in range(10)]
    markers = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p"]
    return {name: (colors[i % 10], markers[(i // 10 + i) % len(markers)]) for i, name in enumerate(sorted(lines))}


def draw_panel(ax: Axes, rows: pd.DataFrame, metric: str, styles: dict[str, tuple[str, str]]) -> None:
    """One (pattern, mode) panel: a line per method/impl, p10–p90 bars when it is latency.

    One `Line2D` and one `LineCollection` (what `plot` and `vlines` make) per line rather than `errorbar`, built
    directly from numpy slices: the same picture at a fraction of the artists and of the per-line pandas work,
    which keeps a 10,000-row report within seconds.
    """
    # Plain numpy columns, sorted once by (line, kv_len) and cut into lines: per-line pandas slices cost seconds.
    codes, names = pd.factorize(rows["_line"].to_numpy(dtype=object), sort=True)
    cols = {c: pd.to_numeric(rows[c]).to_numpy(float)
            for c in ("kv_len", metric, "latency_ms_p10", "latency_ms_p90") if c in rows.columns}  # fmt: skip
    disturbed = rows["_disturbed"].to_numpy(bool) if "_disturbed" in rows.columns else np.zeros(len(rows), bool)
    order = np.lexsort((cols["kv_len"], codes))
    bars = metric == "latency_ms" and "latency_ms_p10" in cols and "latency_ms_p90" in cols
    for idx in np.split(order, np.flatnonzero(np.diff(codes[order])) + 1) if len(order) else []:
        x = cols["kv_len"][idx]
        y = cols[metric][idx] / (MIB if metric == "peak_mem_bytes" else 1)
        color, marker = styles[names[codes[idx[0]]]]
        ax.add_line(Line2D(x, y, color=color, marker=marker, markersize=3.5, linewidth=1.2))
        hit = disturbed[idx]
        if hit.any():  # hollow over the filled marker: the point stays on its line, visibly distrusted
            ax.add_line(Line2D(x[hit], y[hit], linestyle="none", marker=marker, markersize=5, markerfacecolor="white",
                               markeredgecolor=color, markeredgewidth=1.0, gid="disturbed", zorder=3))  # fmt: skip
        if bars:
            lo, hi = cols["latency_ms_p10"][idx], cols["latency_ms_p90"][idx]
            spread = ~(np.isnan(lo) | np.isnan(hi))
            if spread.any():
                xs, lo, hi = x[spread], lo[spread], hi[spread]
                segments = np.stack([np.column_stack([xs, lo]), np.column_stack([xs, hi])], axis=1)
                ax.add_collection(LineCollection(segments, colors=color, linewidths=0.8, linestyles="solid"),
                                  autolim=False)  # fmt: skip
                ax.update_datalim([(xs.min(), lo.min()), (xs.max(), hi.max())])
    ax.autoscale_view()
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(kv_ticks))
    ax.grid(True, which="major", alpha=0.3)


def minor_tick_marks(ax: Axes) -> None:
    """The y axis' unlabelled minor ticks as one artist, drawn where and as matplotlib draws them.

    Why: a log axis over nine decades has ~80 minor ticks, and as `Tick` objects (five artists each) they cost
    ~2 s of a 16-panel figure's ~5 s. The marks keep the locator, the view filter, the marker, size, width,
    colour and side of a real minor tick; an axis whose minor ticks carry labels (about a decade) keeps its Ticks.
    Called once the panel's limits are final.
    """
    axis = ax.yaxis
    locs = np.asarray(axis.get_minorticklocs(), float)
    if not len(locs) or any(axis.minor.formatter.format_ticks(locs)):
        return
    lo, hi = sorted(axis.get_transform().transform(axis.get_view_interval()))
    at = axis.get_transform().transform(locs)
    tol = (hi - lo) * 1e-10  # matplotlib's own test of a tick in view (transforms._interval_contains_close)
    locs = locs[(at >= lo - tol) & (at <= hi + tol)]
    proto = axis.get_minor_ticks(1)[0].tick1line  # a real minor tick: its marker, size, width, colour, transform
    marks = Line2D(np.zeros(len(locs)), locs, linestyle="none", marker=proto.get_marker(),
                   markersize=proto.get_markersize(), markeredgewidth=proto.get_markeredgewidth(),
                   color=proto.get_color(), transform=proto.get_transform(), clip_on=False,
                   zorder=axis.get_zorder() + 1e-3)  # right after the axis, which draws its own minor ticks last  # fmt: skip
    ax.add_artist(marks)
    axis.set_minor_locator(NullLocator())


def legend_height(n_lines: int) -> float:
    """Inches the legend below the panels needs."""
    return 0.15 + 0.15 * math.ceil(n_lines / LEGEND_COLUMNS)


def figure_layout(n_panels: int, n_lines: int) -> tuple[int, int, float, float]:
    """(rows, cols, width, height) in inches: three panels across a page, room below for the legend."""
    ncols = min(3, n_panels)
    nrows = math.ceil(n_panels / ncols)
    width = 7.0 if ncols > 1 else 4.5
    height = TOP_IN + 2.55 * nrows + legend_height(n_lines)
    return nrows, ncols, width, height


def legend_handles(styles: dict[str, tuple[str, str]], disturbed: bool) -> list[Line2D]:
    """A handle per line, and one for hollow (disturbed) points when a panel draws any."""
    handles = [
        Line2D([], [], color=c, marker=m, markersize=3.5, linewidth=1.2, label=n) for n, (c, m) in styles.items()
    ]
    if disturbed:
        handles.append(Line2D([], [], linestyle="none", marker="o", markersize=5, markerfacecolor="white",
                              markeredgecolor="black", label=LABEL))  # fmt: skip
    return handles


def plot_figure(rows: pd.DataFrame, metric: str, title: str, path: Path) -> Path:
    """One figure, saved (see `context_figure`)."""
    context_figure(rows, metric, title).savefig(path)
    return path


def context_figure(rows: pd.DataFrame, metric: str, title: str) -> Figure:
    """One figure: a log-log panel per (pattern, mode), one shared legend below, sized for a page width."""
    panels = panel_order(rows)
    styles = line_styles(rows["_line"].unique())
    disturbed = bool(rows["_disturbed"].any()) if "_disturbed" in rows.columns else False
    nrows, ncols, width, height = figure_layout(len(panels), len(styles) + disturbed)
    fig = Figure(figsize=(width, height), dpi=150)
    FigureCanvasAgg(fig)
    legend_in = legend_height(len(styles) + disturbed)
    fig.subplots_adjust(
        left=0.7 / width, right=1 - 0.15 / width, top=1 - TOP_IN / height, bottom=(legend_in + 0.45) / height,
        hspace=0.45, wspace=0.3,
    )  # fmt: skip
    axes = fig.subplots(nrows, ncols, squeeze=False)
    name, ylabel = METRIC_AXES[metric]
    for i, (ax, (pattern, mode)) in enumerate(zip(axes.flat, panels, strict=False)):
        draw_panel(ax, rows[(rows["_pattern"] == pattern) & (rows["_mode"] == mode)], metric, styles)
        ax.set_title(f"{pattern} · {mode}", fontsize=9, y=1.0)  # where auto-placement puts it, without its layout pass
        ax.tick_params(which="both", labelsize=7)
        minor_tick_marks(ax)
        if i + ncols >= len(panels):  # the lowest panel of its column
            ax.set_xlabel("context length kv_len (tokens)", fontsize=8)
        if i % ncols == 0:
            ax.set_ylabel(ylabel, fontsize=8)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    fig.legend(handles=legend_handles(styles, disturbed), loc="lower center", bbox_to_anchor=(0.5, 0.1 / height),
               ncol=LEGEND_COLUMNS, fontsize=7, frameon=False)  # fmt: skip
    fig.suptitle(f"{name} vs context length\n{title}", fontsize=10, y=1 - 0.08 / height, va="top")
    return fig


def placeholder_figure(metric: str, path: Path) -> Path:
    """The file still exists when nothing is plottable, and says why, so a paper build does not break silently."""
    fig = Figure(figsize=(4.5, 1.6), dpi=150)
    FigureCanvasAgg(fig)
    name, _ = METRIC_AXES[metric]
    fig.text(
        0.5,
        0.5,
        f"{name} vs context length: no rows to plot\n(needs ok, compiled rows of a task drawn against the context "
        f"length, with kv_len and {metric})",
        ha="center",
        va="center",
        fontsize=7,
    )
    fig.savefig(path)
    return path


def write_plots(
    df: pd.DataFrame, out_dir: Path, metric: str, main_name: str, max_extra: int = MAX_EXTRA_FIGURES
) -> tuple[list[Path], int]:
    """The main figure under `main_name`, one more file per other task/hardware/dtype; (files, rows not drawn).

    Each figure goes through `background.draw`: under a report's drawer it may be drawn in a child. The
    placeholder of a metric with nothing to plot is drawn here.
    """
    data = plot_data(df, metric)
    figures = figure_rows(data)
    if not figures:
        return [placeholder_figure(metric, out_dir / main_name)], 0
    stem = Path(main_name).stem
    paths, drawn = [], 0
    for i, (figure, title, rows) in enumerate(figures[: 1 + max_extra]):
        path = out_dir / (main_name if i == 0 else f"{stem}__{file_slug(figure)}.png")
        background.draw(plot_figure, rows, metric, title, path)
        paths.append(path)
        drawn += len(rows)
    return paths, len(data) - drawn


def context_plots(df: pd.DataFrame, out: Path) -> tuple[list[Path], int]:
    """Latency, memory and % of peak (the most measured mode only) against context; (files, pairs not drawn)."""
    latency, lat_not_drawn = write_plots(df, out, "latency_ms", LATENCY_PNG)
    memory, mem_not_drawn = write_plots(df, out, "peak_mem_bytes", MEMORY_PNG)
    peak: list[Path] = []
    rows = context_rows(df)
    modes = rows.loc[rows["pct_peak"].notna(), "_mode"].value_counts()
    if not modes.empty:
        # One figure, the most measured mode only: % of peak judges a kernel, and at 10k rows each panel costs seconds.
        peak, _ = write_plots(df[df["_mode"] == modes.index[0]], out, "pct_peak", PEAK_PNG, max_extra=0)
    return latency + memory + peak, lat_not_drawn + mem_not_drawn


def plots_part(paths: list[Path], not_drawn: int) -> Part:
    """The figures, and what they leave out."""
    text = [
        "Compiled rows only (interpreted rows are never plotted). Context-length figures: one per task, hardware "
        "and dtype, for the tasks drawn against the context length; each draws the point (B×H×D and other keys) "
        f"with most rows. Hollow points (legend: {LABEL}) are rows whose timing the interference probe found "
        "disturbed; the memory figure marks none (memory is measured without the clock)."
    ]
    if not_drawn:
        text.append(f"{not_drawn} plottable (row, metric) pairs of other points are in the tables only.")
    return Part("Plots", text=text, figures=paths)
