"""The per-cell tables, the provenance list and the Not measured tables.

Per-cell tables: one per (task, hardware, pattern, mode, dtype, interpreted),
never mixing what must not be compared. Within a table, the keys that vary
make one compact `point` column (the ones that do not are stated once, in the
caption), the declared metrics follow (headline first), and rows are sorted by
point and then best first on the task's headline metric, in its direction.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from bench.disturbed import FLAGS, MARK, SLOWDOWN, WAIT, disturbed_mask, flag, is_timing_metric, probed, timed_mask
from bench.report.document import Item, Part, Table
from bench.report.format import (
    CONTEXT,
    DEFAULTS,
    DISTURBED_NOTE,
    MISSING,
    PARAMS,
    SHAPE_TRIPLE,
    SPREAD,
    fmt_metric,
    fmt_spread,
    fmt_value,
    listed,
    map_distinct,
    marked,
    metric_header,
    point_text,
    varies,
)
from bench.report.rows import row_keys, row_metrics
from bench.results import STATUSES
from tasks.base import Metric

MODE_ORDER = ("fwd", "bwd", "fwd_bwd", "decode")
PATTERN_ORDER = ("causal self", "non-causal self", "causal cross", "non-causal cross")
IN_HEADING = ("causal", "mode", "dtype")  # keys a table's heading already states (with the pattern)
MAX_LISTED = 8  # provenance values listed before "+N more"
INTERP_NOTE = "Triton CPU interpreter (latency not comparable with compiled rows)"


# ---------------------------------------------------------------- ordering


def pattern_mode_order(pattern: str, mode: str) -> tuple:
    """Panels and tables in reading order: causal self first, the forward pass first."""
    p = PATTERN_ORDER.index(pattern) if pattern in PATTERN_ORDER else len(PATTERN_ORDER)
    m = MODE_ORDER.index(mode) if mode in MODE_ORDER else len(MODE_ORDER)
    return (p, pattern, m, mode)


def group_order(key: tuple) -> tuple:
    """Tables in reading order: task, hardware, pattern, mode, dtype, compiled before interpreted."""
    task, hw, pattern, mode, dtype, interp = key
    return (task, hw, *pattern_mode_order(pattern, mode), dtype, interp)


def table_groups(df: pd.DataFrame) -> list[tuple[tuple, pd.DataFrame]]:
    """The ok rows split into tables, in reading order: one per (task, hardware, pattern, mode, dtype, interpreted)."""
    ok = df[df["status"].eq("ok")]
    by = ["_task", "_hw", "_pattern", "_mode", "_dtype", "_interp"]
    return sorted(ok.groupby(by, sort=False), key=lambda kv: group_order(kv[0]))


def sortable(values: pd.Series) -> pd.Series:
    """A key column as something that sorts: numbers as numbers (1024 before 16384), anything else as text."""
    numbers = pd.to_numeric(values, errors="coerce")
    if numbers.notna().sum() == values.notna().sum():
        return numbers
    return map_distinct(values, fmt_value)


def ranked_order(values: pd.Series, metric: Metric | None) -> pd.Series:
    """Sort key putting the best value first in the metric's declared direction (missing values last)."""
    numbers = pd.to_numeric(values, errors="coerce")
    if metric is None or metric.better is None:
        return pd.Series(0.0, index=values.index)
    return -numbers if metric.better == "higher" else numbers


# ---------------------------------------------------------------- per-cell tables


def shown_metrics(metrics: list[Metric], headline: str | None, group: pd.DataFrame) -> list[Metric]:
    """The metric columns of a table: the headline, then the metrics compare judges, then the other ranked ones.

    Descriptive metrics (no better direction: counts, chance levels) and the
    spread companions of another metric stay in the results files; a metric
    with no value in the table gets no column.
    """
    names = {m.name for m in metrics}
    companions = {m.name for m in metrics for s in SPREAD if m.name.endswith(s) and m.name[: -len(s)] in names}
    shown = [m for m in metrics if m.better and m.name not in companions
             and m.name in group.columns and group[m.name].notna().any()]  # fmt: skip
    return sorted(shown, key=lambda m: (m.name != headline, m.judge is None))


def has_spread(metric: Metric, metrics: list[Metric], group: pd.DataFrame) -> bool:
    names = {m.name for m in metrics}
    return all(f"{metric.name}{s}" in names and f"{metric.name}{s}" in group.columns for s in SPREAD)


def split_keys(group: pd.DataFrame, keys: Sequence[str]) -> tuple[list[str], list[str]]:
    """(keys that vary within the table, keys with one meaningful value): the first make the point column.

    Method parameters vary only where one method ran with several sets (`params_text`).
    """
    keys = [k for k in keys if k in group.columns and k not in IN_HEADING and group[k].notna().any()]
    varying = [k for k in keys if varies(group, k) or (k != PARAMS and group[k].isna().any())]
    for unit in (CONTEXT, SHAPE_TRIPLE):  # shown as one piece (N, B×H×D): varying if any part varies
        if set(unit) & set(varying):
            varying += [k for k in keys if k in unit and k not in varying]
    constant = [k for k in keys if k not in varying and k != PARAMS and fmt_value(group[k].iloc[0]) not in DEFAULTS]
    return varying, constant


def cell_table(group: pd.DataFrame, table_id: str = "") -> Table:
    """One per-cell table of ok rows of one group: method, impl, point, the declared metrics; ranked within a point."""
    keys = row_keys(group)
    metrics, headline = row_metrics(group)
    varying, constant = split_keys(group, keys)
    shown = shown_metrics(metrics, headline, group)
    head = next((m for m in shown if m.name == headline), None)
    order = pd.DataFrame({f"k{i}": sortable(group[k]) for i, k in enumerate(varying)}, index=group.index)
    point_rank = (order.groupby(list(order.columns), sort=True, dropna=False).ngroup() if varying
                  else pd.Series(0, index=group.index))  # fmt: skip
    order["_point"] = point_rank
    order["_best"] = ranked_order(group[headline], head) if head is not None else 0.0
    order["_name"] = group["method"].astype(str) + "/" + group["impl"].astype(str)
    group = group.loc[order.sort_values(["_point", "_best", "_name"], na_position="last", kind="stable").index]

    cells = pd.DataFrame({"method": group["method"].astype(str), "impl": group["impl"].astype(str)}, index=group.index)
    sort_keys = pd.DataFrame(index=group.index)
    if varying:
        cells["point"] = point_text(group, varying)
        sort_keys["point"] = point_rank.loc[group.index]
    notes = []
    disturbed, any_marked = disturbed_mask(group), False
    for m in shown:
        header = metric_header(m, group[m.name])
        spread = has_spread(m, metrics, group)
        cells[header] = fmt_spread(group, m) if spread else fmt_metric(group[m.name], m)
        if is_timing_metric(m.name, m.unit, m.judge):
            cells[header] = marked(cells[header], disturbed)
            any_marked |= bool(cells[header].str.endswith(MARK).any())
        sort_keys[header] = pd.to_numeric(group[m.name], errors="coerce")
        if spread:
            notes.append(f"{m.label or m.name}: value [p10–p90]")
    caption_bits = []
    if constant:
        caption_bits.append("All rows: " + point_text(group.iloc[:1], constant, sep=", ").iloc[0])
    if head is not None:
        caption_bits.append(f"best {head.label or head.name} first at each point")
    caption_bits += notes
    return Table(
        cells,
        caption="; ".join(caption_bits) + ("." if caption_bits else ""),
        id=table_id,
        sort_keys=sort_keys,
        cell_ids=group["cell_id"].astype(str),
        attrs=pd.DataFrame({"task": group["_task"], "pattern": group["_pattern"], "dtype": group["_dtype"]}),
        numeric=tuple(c for c in sort_keys.columns if c != "point"),
        note=DISTURBED_NOTE if any_marked else "",
    )


def table_title(pattern: str, mode: str, dtype: str, hw: str, interp: bool, many_hw: bool) -> str:
    """'causal self · fwd · float16', with the hardware when the results span several profiles."""
    bits = [pattern, mode, dtype] + ([hw] if many_hw else [])
    title = " · ".join(b for b in bits if b)
    return f"{title} — {INTERP_NOTE}" if interp else title


def cell_parts(df: pd.DataFrame) -> list[Part]:
    """'Task: X' parts, each with one collapsible sub-part per table of its ok rows."""
    ok = df[df["status"].eq("ok")]
    if ok.empty:
        return [Part("Results by cell", text=["No cell finished with status `ok`; see *Not measured*."])]
    many_hw = ok["_hw"].nunique() > 1
    parts: list[Part] = []
    current = None
    for i, (key, group) in enumerate(table_groups(df)):
        task, hw, pattern, mode, dtype, interp = key
        if task != current:
            current = task
            parts.append(Part(f"Task: {task or MISSING}"))
        title = table_title(pattern, mode, dtype, hw, interp, many_hw)
        parts.append(Part(title, level=3, tables=[cell_table(group, f"cells-{i}")], collapsible=True))
    return parts


# ---------------------------------------------------------------- provenance and not measured


def uniques(df: pd.DataFrame, col: str) -> list[str]:
    """Distinct non-null values of a column as text, in first-seen order."""
    if col not in df.columns:
        return []
    return [str(v) for v in df[col].dropna().unique()]


def item(label: str, values: list[str], code: bool = True) -> Item:
    shown, more = listed(values, MAX_LISTED)
    return Item(label, shown, more, code)


def provenance_part(df: pd.DataFrame, results_dir: Path, n_corrupt: int) -> Part:
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
    rows = f"{len(df)} ({by_status})" + (f"; unreadable files: {n_corrupt}" if n_corrupt else "")
    return Part(
        "Provenance",
        items=[
            item("Results", [str(results_dir)]),
            item("Run id(s)", uniques(df, "run_id")),
            item("Device(s)", uniques(df, "device")),
            item("Hardware profile(s)", uniques(df, "hardware")),
            item("Git commit(s)", git),
            item("torch", uniques(df, "torch_version")),
            item("triton", uniques(df, "triton_version")),
            item("python", uniques(df, "python_version")),
            Item("Rows", [rows], code=False),
            Item("Generated", [datetime.now(timezone.utc).isoformat(timespec="seconds")], code=False),
        ],
    )


def timing_line(df: pd.DataFrame) -> str:
    """The report's first line: how many timed rows the interference probe found disturbed, and their mark.

    Stated even when none was (a reader cannot tell 'quiet' from 'not checked' by the absence of marks), and
    rows written before the probe say so rather than passing for quiet ones.
    """
    timed = timed_mask(df)
    n, hit = int(timed.sum()), timed & disturbed_mask(df)
    if hit.any():
        kinds = " or ".join(f for f in FLAGS if f in df.columns and df.loc[hit, f].map(flag).any())
        slowdown = pd.to_numeric(df.loc[hit, SLOWDOWN], errors="coerce") if SLOWDOWN in df.columns else None
        most = slowdown.max() if slowdown is not None else float("nan")
        worst = f"; probe up to {most:.1f}x slower than idle" if pd.notna(most) else ""
        wait = pd.to_numeric(df.loc[hit, WAIT], errors="coerce").max() if WAIT in df.columns else float("nan")
        worst += f"; threads waited up to {wait:.0%} of the time for a core" if pd.notna(wait) else ""
        return (f"Timing: {int(hit.sum())} of {n} timed rows were disturbed ({kinds}{worst}) and are marked {MARK}: "
                "after their timing values in the tables, hollow in the timing plots; their timings are kept but not "
                "to be trusted.")  # fmt: skip
    if not probed(df):
        return (f"Timing: no timed row was disturbed as far as the rows say: none of the {n} timed rows carries an "
                "interference-probe reading (written before the probe, or with it turned off).")  # fmt: skip
    return f"Timing: no timed row was disturbed ({n} timed rows; interference probe quiet)."


def failure_points(rows: pd.DataFrame, everything: pd.DataFrame) -> pd.Series:
    """The whole point of a failed row: pattern, mode, dtype, shape and context always; other keys where they vary."""
    keys = row_keys(rows)
    shape = [k for k in keys if k in (*SHAPE_TRIPLE, *CONTEXT)]
    others = [k for k in keys if k not in shape and k not in IN_HEADING and varies(everything, k)]
    text = rows["_pattern"] + " " + rows["_mode"] + " " + rows["_dtype"]
    rest = point_text(rows, [*shape, *others], sep=" ")
    return (text + " " + rest).str.replace(r"\s+", " ", regex=True).str.strip()


def not_measured_part(df: pd.DataFrame, corrupt: list[tuple[str, str]]) -> Part:
    """Every row that is not ok, by status, with its reason, and every unreadable file: absence must be visible."""
    bad = df[df["status"].ne("ok")]
    part = Part("Not measured")
    if bad.empty and not corrupt:
        part.text.append("Every cell finished with status `ok`.")
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
        cells["point"] = failure_points(rows, df)
        cells["reason"] = rows["reason"].astype(object).where(rows["reason"].notna(), MISSING).astype(str)
        part.tables.append(Table(cells, caption=f"{status} ({len(rows)})"))
    if corrupt:
        part.tables.append(
            Table(
                pd.DataFrame(corrupt, columns=["file", "reason"]), caption=f"unreadable results files ({len(corrupt)})"
            )
        )
    return part


def impl_text(df: pd.DataFrame) -> pd.Series:
    """The impl name, marked when the kernel ran under the CPU interpreter."""
    return df["impl"].astype(str) + df["_interp"].map({True: " (interp.)", False: ""})
