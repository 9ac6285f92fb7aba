"""The report: leaderboard tables (Markdown, LaTeX, HTML) and plots from a results folder.

`python -m bench.report RESULTS_DIR [--out DIR] [--baseline softmax/sdpa]` writes into RESULTS_DIR/report/:
`leaderboard.md`, `leaderboard.tex` (booktabs), `index.html` (self-contained), `latency_vs_seq_len.png`,
`memory_vs_seq_len.png`, `pct_peak_vs_seq_len.png`, `efficiency_length.png`, `pareto_<task>.png`, and the
needle heat maps and MQAR recall-vs-state plots when those tasks have rows.

Rules the report keeps, because a leaderboard that breaks them misleads:
- every row that is not `ok` is listed, with its reason, under "Not measured";
  an unreadable results file is listed there too, never silently skipped;
- rows run under the Triton CPU interpreter (`interpreted`) get their own
  tables and never appear in a plot: their latency says nothing about the kernel;
- rows from different hardware profiles, patterns, modes or dtypes are never
  in one table or on one line.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import warnings
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter

from bench.results import CORE_COLUMNS, STATUSES, load

MIB = 2**20
MODE_ORDER = ("fwd", "bwd", "fwd_bwd", "decode")
PATTERN_ORDER = ("causal self", "non-causal self", "causal cross", "non-causal cross")
PLOT_TASK = "scaling"  # the task whose x axis is the context length; other tasks are plotted only without it
LATENCY_PNG = "latency_vs_seq_len.png"
MEMORY_PNG = "memory_vs_seq_len.png"
PEAK_PNG = "pct_peak_vs_seq_len.png"
MAX_EXTRA_FIGURES = 12  # per metric: a cap on files when results span many task/hardware/dtype combinations
LEGEND_COLUMNS = 3
TOP_IN = 0.85  # inches above the panels: the two-line figure title and the panel titles
MAX_LISTED = 8  # provenance values listed before "+N more"
MISSING = "–"
DEFAULTS = ("{}", "", MISSING)  # key values that say nothing (method_params of a method without parameters)

# Extra (non-core) columns that are not sweep keys: bookkeeping, or metrics shown as metrics.
NOT_KEYS = frozenset(
    {"impl_kind", "exact", "interpreted", "repeats", "cell_seconds", "state_bytes", "sparsity", "threads"}
)
# Columns the report adds to the frame start with "_" (_pattern, _interp, _line, ...): never shown as keys.
SHAPE_COLUMNS = ("dtype", "batch", "heads", "seq_len", "kv_len", "head_dim", "causal", "mode")


class NoResults(SystemExit):
    """Nothing to report on. A SystemExit so a script stops with the one-line message, not a traceback."""


# ---------------------------------------------------------------- loading


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
    known = df["seq_len"].notna() & df["kv_len"].notna()
    cross = known & df["seq_len"].ne(df["kv_len"]) & df["mode"].ne("decode")
    kind = pd.Series("", index=df.index, dtype=object)
    kind[known] = "self"
    kind[cross] = "cross"
    label = (causal + " " + kind).str.strip()
    return label.where(label != "", "any")


def prepare(df: pd.DataFrame) -> pd.DataFrame:
    """The frame with the grouping columns the tables and plots share, as plain strings (no NaN keys)."""
    df = df.copy()
    for col in ("interpreted", *SHAPE_COLUMNS):
        if col not in df.columns:
            df[col] = None
    df["_pattern"] = pattern_labels(df)
    df["_interp"] = df["interpreted"].eq(True)
    for src, dst in (("hardware", "_hw"), ("task", "_task"), ("mode", "_mode"), ("dtype", "_dtype")):
        df[dst] = df[src].astype(object).where(df[src].notna(), "").astype(str)
    return df


def extra_keys(df: pd.DataFrame) -> list[str]:
    """Sweep keys beyond the core shape (input_dist, method_params, a task's depth, beta, ...), in column order."""
    keys = []
    for col in df.columns:
        if col in CORE_COLUMNS or col in NOT_KEYS or col.startswith("_") or df[col].isna().all():
            continue
        first = df[col].dropna().iloc[0]
        if isinstance(first, list | tuple | dict | np.ndarray):
            continue  # list-valued: samples, not a key
        keys.append(col)
    return keys


# ---------------------------------------------------------------- formatting


def fmt_num(x: float | None, digits: int = 3) -> str:
    """`digits` significant figures, never an exponent for numbers >= 1, a dash for missing values."""
    if x is None or (isinstance(x, float) and math.isnan(x)) or pd.isna(x):
        return MISSING
    x = float(x)
    if x == 0:
        return "0"
    if abs(x) >= 10 ** (digits - 1):
        return f"{x:.0f}"
    if abs(x) < 1e-3:
        return f"{x:.{digits - 1}e}"
    return f"{x:.{digits}g}"


def fmt_sci(x: float | None) -> str:
    """Errors span decades; an exponent reads better than leading zeros."""
    return MISSING if x is None or pd.isna(x) else f"{float(x):.2e}"


def fmt_latency(df: pd.DataFrame) -> pd.Series:
    """'median [p10–p90]' in ms: the spread tells a real difference from noise."""
    med = df["latency_ms"].map(fmt_num)
    has_spread = df["latency_ms_p10"].notna() & df["latency_ms_p90"].notna() & df["latency_ms"].notna()
    spread = " [" + df["latency_ms_p10"].map(fmt_num) + "–" + df["latency_ms_p90"].map(fmt_num) + "]"
    return med + spread.where(has_spread, "")


def fmt_value(x: object) -> str:
    """A key value of any type (depth, beta, variant, method_params) as table text."""
    if x is None or (not isinstance(x, str) and pd.isna(x)):
        return MISSING
    if isinstance(x, float):
        return fmt_num(x, 4)
    return str(x)


def shape_text(df: pd.DataFrame) -> pd.Series:
    """'B×H×D' as '1×8×64': the problem size besides the sequence."""
    parts = [df[c].map(lambda v: MISSING if pd.isna(v) else str(int(v))) for c in ("batch", "heads", "head_dim")]
    return parts[0] + "×" + parts[1] + "×" + parts[2]


def seq_text(df: pd.DataFrame, cross: bool) -> pd.Series:
    """kv_len (the context), or 'q / kv' for cross-attention where both matter."""

    def ints(s: pd.Series) -> pd.Series:
        return s.map(lambda v: MISSING if pd.isna(v) else str(int(v)))

    return ints(df["seq_len"]) + " / " + ints(df["kv_len"]) if cross else ints(df["kv_len"])


def impl_text(df: pd.DataFrame) -> pd.Series:
    """The impl name, marked when the kernel ran under the CPU interpreter."""
    return df["impl"].astype(str) + df["_interp"].map({True: " (interp.)", False: ""})


def md_escape(s: pd.Series) -> pd.Series:
    """Cell text that cannot break a Markdown table: no pipes, no newlines."""
    return s.astype(str).str.replace("|", r"\|", regex=False).str.replace(r"[\r\n]+", " ", regex=True)


def md_table(cells: pd.DataFrame) -> str:
    """A Markdown table from a frame of strings, headed by its column names."""
    if cells.empty:
        return "_none_\n"
    header = "| " + " | ".join(cells.columns) + " |"
    rule = "|" + "|".join("---" for _ in cells.columns) + "|"
    body = md_escape(cells.iloc[:, 0]).radd("| ")
    for col in cells.columns[1:]:
        body = body + " | " + md_escape(cells[col])
    return "\n".join([header, rule, *(body + " |")]) + "\n"


# ---------------------------------------------------------------- leaderboard tables

# (column, header, formatter) for each metric a table may show; shown only where not all-null.
METRICS: tuple[tuple[str, str, Callable[[pd.DataFrame], pd.Series]], ...] = (
    ("latency_ms", "latency ms (median [p10–p90])", fmt_latency),
    ("tflops", "TFLOP/s", lambda d: d["tflops"].map(fmt_num)),
    ("pct_peak", "% peak", lambda d: d["pct_peak"].map(lambda v: MISSING if pd.isna(v) else f"{v:.1f}")),
    ("peak_mem_bytes", "peak memory (MiB)", lambda d: (d["peak_mem_bytes"] / MIB).map(fmt_num)),
    ("state_bytes", "state (MiB)", lambda d: (d["state_bytes"] / MIB).map(fmt_num)),
    ("fidelity_rel", "fidelity (rel)", lambda d: d["fidelity_rel"].map(fmt_sci)),
    ("fidelity_max_abs", "max abs err", lambda d: d["fidelity_max_abs"].map(fmt_sci)),
    ("accuracy", "accuracy", lambda d: d["accuracy"].map(lambda v: fmt_num(v, 4))),
)


def present_metrics(df: pd.DataFrame) -> list[tuple[str, str, Callable[[pd.DataFrame], pd.Series]]]:
    """The metrics this table has values for: a task without latency shows no latency column."""
    return [m for m in METRICS if m[0] in df.columns and df[m[0]].notna().any()]


def sort_rows(df: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """By context, then shape and keys, then fastest first (or most accurate first without latency)."""
    order = [c for c in ("kv_len", "batch", "heads", "head_dim", "seq_len", *keys) if c in df.columns]
    ascending = [True] * len(order)
    if df["latency_ms"].notna().any():
        order.append("latency_ms")
        ascending.append(True)
    elif "accuracy" in df.columns and df["accuracy"].notna().any():
        order.append("accuracy")
        ascending.append(False)
    order += ["method", "impl"]
    ascending += [True, True]
    sortable = df.copy()
    for col in keys:  # mixed-type keys cannot be compared; sort them as text
        sortable[col] = sortable[col].map(fmt_value)
    return df.loc[sortable.sort_values(order, ascending=ascending, na_position="last", kind="stable").index]


def results_table(group: pd.DataFrame, keys: list[str]) -> str:
    """One Markdown table of ok rows; keys constant over the table go in a caption line, varying ones get columns."""
    caption, cells = table_cells(group, keys)
    return (caption + "\n\n" if caption else "") + md_table(cells)


def table_cells(group: pd.DataFrame, keys: list[str]) -> tuple[str, pd.DataFrame]:
    """(caption, cells as text) of one table: shared by the Markdown, LaTeX and HTML renderings."""
    keys = [k for k in keys if group[k].notna().any()]
    varying = [k for k in keys if group[k].map(fmt_value).nunique() > 1]
    constant = [k for k in keys if k not in varying and fmt_value(group[k].dropna().iloc[0]) not in DEFAULTS]
    group = sort_rows(group, varying)
    cells = pd.DataFrame({"method": group["method"].astype(str), "impl": impl_text(group)}, index=group.index)
    if group["kv_len"].notna().any():
        cross = bool(group["_pattern"].iloc[0].endswith("cross"))
        cells["seq (q / kv)" if cross else "seq (kv_len)"] = seq_text(group, cross)
    if group["batch"].notna().any():
        cells["B×H×D"] = shape_text(group)
    for key in varying:
        cells[key] = group[key].map(fmt_value)
    for _col, header, fmt in present_metrics(group):
        cells[header] = fmt(group)
    caption = ""
    if constant:
        caption = "All rows: " + ", ".join(f"{k}={fmt_value(group[k].dropna().iloc[0])}" for k in constant)
    return caption, cells


def table_heading(task: str, hw: str, pattern: str, mode: str, dtype: str, interp: bool, many_hw: bool) -> str:
    """'causal self · fwd · float16', with the hardware when the results span several profiles."""
    bits = [pattern, mode, dtype] + ([hw] if many_hw else [])
    title = " · ".join(b for b in bits if b)
    if interp:
        title += " — Triton CPU interpreter (latency not comparable with compiled rows)"
    return f"### {title}\n"


def group_order(key: tuple) -> tuple:
    """Tables in reading order: task, hardware, pattern, mode (fwd first), dtype, compiled before interpreted."""
    task, hw, pattern, mode, dtype, interp = key
    p = PATTERN_ORDER.index(pattern) if pattern in PATTERN_ORDER else len(PATTERN_ORDER)
    m = MODE_ORDER.index(mode) if mode in MODE_ORDER else len(MODE_ORDER)
    return (task != PLOT_TASK, task, hw, p, pattern, m, mode, dtype, interp)


def table_groups(df: pd.DataFrame) -> list[tuple[tuple, pd.DataFrame]]:
    """The ok rows split into tables, in reading order: one per (task, hardware, pattern, mode, dtype, interpreted)."""
    ok = df[df["status"].eq("ok")]
    by = ["_task", "_hw", "_pattern", "_mode", "_dtype", "_interp"]
    return sorted(ok.groupby(by, sort=False), key=lambda kv: group_order(kv[0]))


def leaderboard_sections(df: pd.DataFrame) -> str:
    """One section per task, one table per (hardware, pattern, mode, dtype, interpreted) of its ok rows."""
    ok = df[df["status"].eq("ok")]
    if ok.empty:
        return "## Results\n\nNo cell finished with status `ok`; see *Not measured*.\n"
    keys = extra_keys(ok)
    many_hw = ok["_hw"].nunique() > 1
    groups = table_groups(df)
    out, current_task = [], None
    for key, group in groups:
        if key[0] != current_task:
            current_task = key[0]
            out.append(f"## Task: {current_task or MISSING}\n")
        out.append(table_heading(*key, many_hw=many_hw))
        out.append(results_table(group, keys))
    return "\n".join(out)


# ---------------------------------------------------------------- provenance and not measured


def listed(values: Sequence[str]) -> str:
    """Values joined for a header line, cut after MAX_LISTED so a long campaign stays one line."""
    values = [v for v in values if v not in ("", "None", "nan")]
    if not values:
        return MISSING
    shown = ", ".join(f"`{v}`" for v in values[:MAX_LISTED])
    return shown + (f" (+{len(values) - MAX_LISTED} more)" if len(values) > MAX_LISTED else "")


def uniques(df: pd.DataFrame, col: str) -> list[str]:
    """Distinct non-null values of a column as text, in first-seen order."""
    if col not in df.columns:
        return []
    return [str(v) for v in df[col].dropna().unique()]


def provenance_section(df: pd.DataFrame, results_dir: Path, n_corrupt: int) -> str:
    """Where the numbers came from: a reader must be able to tell two runs, machines or code versions apart."""
    commits = df[["git_commit", "git_dirty"]].dropna(subset=["git_commit"]).drop_duplicates()
    git = [
        f"{c[:12]}{' (dirty)' if pd.notna(d) and bool(d) else ''}"
        for c, d in zip(commits["git_commit"], commits["git_dirty"], strict=True)
    ]
    counts = df["status"].value_counts()
    by_status = ", ".join(
        f"{s} {counts[s]}" for s in (*STATUSES, *sorted(set(counts.index) - set(STATUSES))) if s in counts
    )
    lines = [
        f"- Results: `{results_dir}`",
        f"- Run id(s): {listed(uniques(df, 'run_id'))}",
        f"- Device(s): {listed(uniques(df, 'device'))}",
        f"- Hardware profile(s): {listed(uniques(df, 'hardware'))}",
        f"- Git commit(s): {listed(git)}",
        f"- torch: {listed(uniques(df, 'torch_version'))}; triton: {listed(uniques(df, 'triton_version'))}; "
        f"python: {listed(uniques(df, 'python_version'))}",
        f"- Rows: {len(df)} ({by_status})" + (f"; unreadable files: {n_corrupt}" if n_corrupt else ""),
        f"- Generated: {datetime.now(timezone.utc).isoformat(timespec='seconds')}",
    ]
    return "## Provenance\n\n" + "\n".join(lines) + "\n"


def key_shape_text(df: pd.DataFrame, keys: list[str]) -> pd.Series:
    """The whole point on one line ('causal self fwd float16 B×H×D=1×8×64 q=1024 kv=1024 input_dist=peaked')."""
    text = df["_pattern"] + " " + df["_mode"] + " " + df["_dtype"]
    if df["batch"].notna().any():
        text = text + " B×H×D=" + shape_text(df)
    for col, name in (("seq_len", "q"), ("kv_len", "kv"), *((k, k) for k in keys)):
        text = text + df[col].map(lambda v, name=name: "" if fmt_value(v) == MISSING else f" {name}={fmt_value(v)}")
    return text.str.replace(r"\s+", " ", regex=True).str.strip()


def not_measured_section(df: pd.DataFrame, corrupt: list[tuple[str, str]]) -> str:
    """Every row that is not ok, by status, with its reason, and every unreadable file: absence must be visible."""
    bad = df[df["status"].ne("ok")]
    out = ["## Not measured\n"]
    if bad.empty and not corrupt:
        out.append("Every cell finished with status `ok`.\n")
    keys = [k for k in extra_keys(df) if df[k].map(fmt_value).nunique() > 1]  # constant keys are noise here
    many_hw = df["_hw"].nunique() > 1
    present = bad["status"].unique()
    for status in [s for s in STATUSES if s in present] + sorted(set(present) - set(STATUSES)):
        rows = bad[bad["status"].eq(status)].sort_values(
            ["_task", "method", "impl", "_pattern", "_mode", "kv_len"], kind="stable"
        )
        cells = pd.DataFrame(
            {"method": rows["method"].astype(str), "impl": impl_text(rows), "task": rows["_task"]}, index=rows.index
        )
        if many_hw:
            cells["hardware"] = rows["_hw"]
        cells["shape"] = key_shape_text(rows, keys)
        cells["reason"] = rows["reason"].astype(object).where(rows["reason"].notna(), MISSING).astype(str)
        out.append(f"### {status} ({len(rows)})\n")
        out.append(md_table(cells))
    if corrupt:
        out.append(f"### unreadable results files ({len(corrupt)})\n")
        out.append(md_table(pd.DataFrame(corrupt, columns=["file", "reason"])))
    return "\n".join(out)


# ---------------------------------------------------------------- plots


def plot_data(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    """The rows a metric-vs-context plot may show: ok, compiled (never interpreted), with kv_len and the metric.

    Only the scaling task when it is present: other tasks' rows vary other keys
    at the same context and would draw zig-zag lines. Each row gets `_line` (the
    legend label), `_figure` (task · hardware · dtype: one file each) and `_subset`
    (the rest of the shape: one figure draws one subset). Duplicates of a point
    keep the latest row.
    """
    if "_pattern" not in df.columns:
        df = prepare(df)
    sel = df[df["status"].eq("ok") & ~df["_interp"] & df[metric].notna() & df["kv_len"].notna() & df["kv_len"].gt(0)]
    if (sel["task"] == PLOT_TASK).any():
        sel = sel[sel["task"] == PLOT_TASK]
    sel = sel.copy()
    if sel.empty:
        for col in ("_line", "_figure", "_subset"):
            sel[col] = pd.Series(dtype=str)
        return sel
    line = sel["method"].astype(str) + "/" + sel["impl"].astype(str)
    if "method_params" in sel.columns:
        # Parameters name a line only where one method was run with several parameter sets.
        several = sel.groupby("method")["method_params"].transform(lambda p: p.map(fmt_value).nunique() > 1)
        line = line + sel["method_params"].map(lambda v: "" if fmt_value(v) in DEFAULTS else f" {v}").where(several, "")
    is_cross = sel["_pattern"].str.endswith("cross")
    sel["_line"] = line + sel["seq_len"].map(lambda v: "" if pd.isna(v) else f" (q={int(v)})").where(is_cross, "")
    figure_cols = [c for c in ("_task", "_hw", "_dtype") if c != "_hw" or sel["_hw"].nunique() > 1]
    sel["_figure"] = joined_labels(sel, figure_cols)
    subset_cols = [k for k in extra_keys(sel) if k != "method_params" and sel[k].map(fmt_value).nunique() > 1]
    sel["_subset"] = ("B×H×D=" + shape_text(sel) + " · " + joined_labels(sel, subset_cols)).str.strip(" ·")
    if "timestamp" in sel.columns:
        sel = sel.sort_values("timestamp", kind="stable", na_position="first")
    return sel.drop_duplicates(["_figure", "_subset", "_pattern", "_mode", "_line", "kv_len"], keep="last")


def joined_labels(df: pd.DataFrame, cols: list[str]) -> pd.Series:
    """'scaling · float16 · input_dist=peaked': derived columns by value, keys as key=value."""
    joined = pd.Series("", index=df.index, dtype=object)
    for col in cols:
        prefix = "" if col.startswith("_") else f"{col}="
        part = df[col].map(lambda v, p=prefix: "" if fmt_value(v) in DEFAULTS else p + fmt_value(v))
        joined = joined + " · " + part
    return joined.str.replace(r"( · )+", " · ", regex=True).str.strip(" ·")


def figure_rows(data: pd.DataFrame) -> list[tuple[str, str, pd.DataFrame]]:
    """(figure label, title, rows) per figure, the one with most rows first (it gets the main file name).

    A figure draws the subset (B×H×D and other keys) with most rows, so each
    line is one method at one shape; the other subsets are in the tables.
    """
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
    return sorted(pairs, key=lambda pm: group_order(("", "", pm[0], pm[1], "", False))[3:7])


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

    Plain `plot` + one `vlines` per line rather than `errorbar`: the same picture at
    a fraction of the artists, which keeps a 10,000-row report within seconds.
    """
    # Plain numpy columns first: slicing Arrow-backed string columns per line dominated a 10k-row report.
    cols = [c for c in ("kv_len", metric, "latency_ms_p10", "latency_ms_p90") if c in rows.columns]
    rows = pd.DataFrame(
        {"_line": rows["_line"].to_numpy(dtype=object), **{c: pd.to_numeric(rows[c]).to_numpy(float) for c in cols}}
    )
    for name, line in rows.groupby("_line", sort=True):
        line = line.sort_values("kv_len")
        x = line["kv_len"].to_numpy(float)
        y = (line[metric] / (MIB if metric == "peak_mem_bytes" else 1)).to_numpy(float)
        color, marker = styles[name]
        ax.plot(x, y, color=color, marker=marker, markersize=3.5, linewidth=1.2)
        if metric == "latency_ms":
            spread = line["latency_ms_p10"].notna() & line["latency_ms_p90"].notna()
            if spread.any():
                lo, hi = line.loc[spread, "latency_ms_p10"], line.loc[spread, "latency_ms_p90"]
                ax.vlines(x[spread.to_numpy()], lo.to_numpy(float), hi.to_numpy(float), color=color, linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(kv_ticks))
    ax.grid(True, which="major", alpha=0.3)


METRIC_AXES = {
    "latency_ms": ("Latency (median; bars p10–p90)", "latency (ms)"),
    "peak_mem_bytes": ("Peak memory", "peak memory (MiB)"),
    "pct_peak": ("Share of the hardware's peak FLOP/s", "% of peak"),
}


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


def plot_figure(rows: pd.DataFrame, metric: str, title: str, path: Path) -> Path:
    """One figure: a log-log panel per (pattern, mode), one shared legend below, sized for a page width."""
    panels = panel_order(rows)
    styles = line_styles(rows["_line"].unique())
    nrows, ncols, width, height = figure_layout(len(panels), len(styles))
    fig = Figure(figsize=(width, height), dpi=150)
    FigureCanvasAgg(fig)
    legend_in = legend_height(len(styles))
    fig.subplots_adjust(
        left=0.7 / width, right=1 - 0.15 / width, top=1 - TOP_IN / height, bottom=(legend_in + 0.45) / height,
        hspace=0.45, wspace=0.3,
    )  # fmt: skip
    axes = fig.subplots(nrows, ncols, squeeze=False)
    name, ylabel = METRIC_AXES[metric]
    for i, (ax, (pattern, mode)) in enumerate(zip(axes.flat, panels, strict=False)):
        draw_panel(ax, rows[(rows["_pattern"] == pattern) & (rows["_mode"] == mode)], metric, styles)
        ax.set_title(f"{pattern} · {mode}", fontsize=9)
        ax.tick_params(which="both", labelsize=7)
        if i + ncols >= len(panels):  # the lowest panel of its column
            ax.set_xlabel("context length kv_len (tokens)", fontsize=8)
        if i % ncols == 0:
            ax.set_ylabel(ylabel, fontsize=8)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    handles = [
        Line2D([], [], color=c, marker=m, markersize=3.5, linewidth=1.2, label=n) for n, (c, m) in styles.items()
    ]
    fig.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, 0.1 / height), ncol=LEGEND_COLUMNS,
               fontsize=7, frameon=False)  # fmt: skip
    fig.suptitle(f"{name} vs context length\n{title}", fontsize=10, y=1 - 0.08 / height, va="top")
    fig.savefig(path)
    return path


def placeholder_figure(metric: str, path: Path) -> Path:
    """The file still exists when nothing is plottable, and says why, so a paper build does not break silently."""
    fig = Figure(figsize=(4.5, 1.6), dpi=150)
    FigureCanvasAgg(fig)
    name, _ = METRIC_AXES[metric]
    fig.text(
        0.5,
        0.5,
        f"{name} vs context length: no rows to plot\n(needs ok, compiled rows with kv_len and {metric})",
        ha="center",
        va="center",
        fontsize=8,
    )
    fig.savefig(path)
    return path


def file_slug(label: str) -> str:
    """A file-name-safe suffix from a figure label."""
    return re.sub(r"[^A-Za-z0-9.=_-]+", "_", label).strip("_") or "other"


def write_plots(
    df: pd.DataFrame, out_dir: Path, metric: str, main_name: str, max_extra: int = MAX_EXTRA_FIGURES
) -> tuple[list[Path], int]:
    """The main figure under `main_name`, one more file per other task/hardware/dtype; (files, rows not drawn)."""
    data = plot_data(df, metric)
    figures = figure_rows(data)
    if not figures:
        return [placeholder_figure(metric, out_dir / main_name)], 0
    figure, title, rows = figures[0]
    paths = [plot_figure(rows, metric, title, out_dir / main_name)]
    drawn = len(rows)
    stem = Path(main_name).stem
    for figure, title, rows in figures[1 : 1 + max_extra]:
        paths.append(plot_figure(rows, metric, title, out_dir / f"{stem}__{file_slug(figure)}.png"))
        drawn += len(rows)
    return paths, len(data) - drawn


def plots_section(paths: list[Path], not_drawn: int) -> str:
    """Links to the figures, so the Markdown shows them inline, and what they leave out."""
    lines = [
        "## Plots\n",
        "Compiled rows only (interpreted rows are never plotted). One figure per task, hardware and dtype; "
        "each draws the shape (B×H×D and other keys) with most rows.\n",
    ]
    if not_drawn:
        lines.append(f"{not_drawn} plottable (row, metric) pairs of other shapes are in the tables only.\n")
    lines += [f"![{p.stem}]({p.name})" for p in paths]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- entry points


def slopes_section(df: pd.DataFrame) -> str:
    """The empirical exponent of latency in context length: ~1 linear-time, ~2 exact, ~0 recurrent decode."""
    from bench.slopes import DEFAULT_MIN_LEN, scaling_slopes

    slopes = scaling_slopes(df)
    slopes = slopes[slopes["slope"].notna()] if not slopes.empty else slopes
    if slopes.empty:
        return ""
    cols = [c for c in ("method", "impl", "pattern", "mode", "dtype", "batch", "heads", "head_dim") if c in slopes]
    table = slopes.sort_values(cols)[cols].astype(str)
    table["slope"] = slopes["slope"].map(lambda x: f"{x:.2f}")
    table["lengths"] = slopes["min_kv_len"].astype(str) + "–" + slopes["max_kv_len"].astype(str)
    table["points"] = slopes["n_lengths"].astype(str)
    return (
        "## Scaling slopes\n\n"
        f"Least-squares slope of log(latency) against log(context length), lengths >= {DEFAULT_MIN_LEN}: "
        "about 1 for a linear-time method, 2 for exact attention once N² dominates, 0 for a recurrent decode step.\n\n"
        + md_table(table)
        + "\n"
    )


def task_sections(df: pd.DataFrame, out: Path, baseline: tuple[str, str]) -> tuple[list[str], list[Path]]:
    """The optional sections and figures: efficiency length, needle and MQAR views, Pareto fronts, % of peak.

    Each appears only when its rows exist, so a scaling-only run's report is unchanged in shape.
    """
    from bench.efficiency import EFFICIENCY_PNG, efficiency_lengths, efficiency_plot, efficiency_table
    from bench.report_plots import pareto_plot

    sections, plots = [], []
    eff = efficiency_lengths(df, baseline)
    sections.append(efficiency_table(eff, baseline))
    if (p := efficiency_plot(eff, out / EFFICIENCY_PNG, baseline)) is not None:
        plots.append(p)
    tasks = set(df.loc[df["status"].eq("ok"), "task"].dropna())
    if "needle" in tasks:
        from bench.needle_report import needle_heatmaps, needle_table

        sections.append("## Needle retrieval (hit rate per context length)\n\n" + needle_table(df))
        plots += needle_heatmaps(df, out)
    if "mqar" in tasks:
        try:
            from bench.mqar_report import mqar_plots, mqar_table
        except ImportError:  # the module is optional: a report without it still has the generic tables
            pass
        else:
            table = mqar_table(df)
            if table:
                sections.append("## MQAR (best learning rate per size)\n\n" + table)
            plots += mqar_plots(df, out)
    for task in sorted(tasks):
        if (p := pareto_plot(df, task, out / f"pareto_{file_slug(task)}.png")) is not None:
            plots.append(p)
    return [s for s in sections if s], plots


def write_report(
    results_dir: Path | str, out_dir: Path | str | None = None, baseline: tuple[str, str] = ("softmax", "sdpa")
) -> Path:
    """Write leaderboard.md/.tex, index.html and the plots; returns the leaderboard's path.

    NoResults when there is nothing to report. `baseline` is the method/impl the efficiency length is measured
    against.
    """
    from bench.report_html import write_html
    from bench.report_latex import latex_leaderboard

    results_dir = Path(results_dir)
    df, corrupt = load_results(results_dir)
    df = prepare(df)
    out = (
        Path(out_dir)
        if out_dir is not None
        else (results_dir if results_dir.is_dir() else results_dir.parent) / "report"
    )
    out.mkdir(parents=True, exist_ok=True)
    latency, lat_not_drawn = write_plots(df, out, "latency_ms", LATENCY_PNG)
    memory, mem_not_drawn = write_plots(df, out, "peak_mem_bytes", MEMORY_PNG)
    peak: list[Path] = []
    modes = df.loc[df["pct_peak"].notna() & df["status"].eq("ok"), "_mode"].value_counts()
    if not modes.empty:
        # One figure, the most measured mode only: % of peak judges a kernel, and at 10k rows each panel costs seconds.
        peak, _ = write_plots(df[df["_mode"] == modes.index[0]], out, "pct_peak", PEAK_PNG, max_extra=0)
    extra_sections, extra_plots = task_sections(df, out, baseline)
    provenance = provenance_section(df, results_dir, len(corrupt))
    slopes = slopes_section(df)
    not_measured = not_measured_section(df, corrupt)
    plots = latency + memory + peak + extra_plots
    text = "\n".join(
        [
            "# attnbench leaderboard\n",
            provenance,
            leaderboard_sections(df),
            slopes,
            *extra_sections,
            not_measured,
            plots_section(plots, lat_not_drawn + mem_not_drawn),
        ]
    )
    path = out / "leaderboard.md"
    path.write_text(text)
    (out / "leaderboard.tex").write_text(latex_leaderboard(df))
    write_html(df, out / "index.html", provenance, not_measured, [slopes, *extra_sections], plots)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: 0 on success, 2 with a one-line message when there is nothing to report."""
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.splitlines()[0])
    parser.add_argument("results_dir", type=Path, help="folder of results (searched recursively)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: RESULTS_DIR/report)")
    parser.add_argument("--baseline", default="softmax/sdpa", metavar="METHOD/IMPL",
                        help="what the efficiency length is measured against (default softmax/sdpa)")  # fmt: skip
    args = parser.parse_args(argv)
    method, _, impl = args.baseline.partition("/")
    try:
        path = write_report(args.results_dir, args.out, (method, impl or "sdpa"))
    except NoResults as err:
        print(f"error: {err.code}", file=sys.stderr)
        return 2
    print(f"report written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
