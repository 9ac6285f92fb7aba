"""Text of the report: numbers, metric headers, sweep points, and escaping for Markdown, LaTeX and HTML.

One module that every renderer imports, so a number, a header or a point reads
the same in leaderboard.md, leaderboard.tex and index.html. Nothing here knows
a task: a metric is formatted by its declared unit, a point by its key names.
"""

from __future__ import annotations

import dataclasses
import html
import json
import re
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

from bench.disturbed import MARK
from tasks.base import Metric

MIB = 2**20
BYTE_UNITS = (("B", 1), ("KiB", 2**10), ("MiB", 2**20), ("GiB", 2**30))
MISSING = "–"
DEFAULTS = ("{}", "", MISSING)  # key values that say nothing (method_params of a method without parameters)
SPREAD = ("_p10", "_p90")  # a metric `x` with declared companions `x_p10`, `x_p90` is shown as 'x [p10–p90]'
SHAPE_TRIPLE = ("batch", "heads", "head_dim")  # shown together as B×H×D
CONTEXT = ("seq_len", "kv_len")  # shown together as N (self) or q / kv (cross)
PARAMS = "method_params"  # every row's key (the runner adds it): shown where one method ran with several sets
# Under every table with a mark: what the mark means (the same words in leaderboard.md, .tex and index.html).
DISTURBED_NOTE = (
    f"{MARK} disturbed: the interference probe found the machine busy (or NVML found the GPU clocks throttled) "
    "while the row was timed, even after re-measuring; its timing values (latency, throughput, % of peak) are "
    "kept but not to be trusted. Its memory and accuracy are unaffected."
)


# ---------------------------------------------------------------- numbers


def fmt_num(x: object, digits: int = 3) -> str:
    """`digits` significant figures, never an exponent for numbers >= 1, a dash for missing values."""
    if x is None or (not isinstance(x, str) and pd.isna(x)):
        return MISSING
    return _fmt_float(float(x), digits)


def _fmt_float(x: float, digits: int) -> str:
    if x == 0:
        return "0"
    if abs(x) >= 10 ** (digits - 1):
        return f"{x:.0f}"
    if abs(x) < 1e-3:
        return f"{x:.{digits - 1}e}"
    return f"{x:.{digits}g}"


def fmt_nums(numbers: pd.Series, digits: int = 3) -> pd.Series:
    """`fmt_num` of a numeric column, in one list pass (100,000-row tables format over a million numbers):
    one conversion to floats instead of a missing-value test and a `float()` per number."""
    values = pd.to_numeric(numbers, errors="coerce").to_numpy(dtype=float, na_value=np.nan).tolist()
    return pd.Series([MISSING if v != v else _fmt_float(v, digits) for v in values], index=numbers.index)


def map_distinct(values: pd.Series, f) -> pd.Series:
    """`values.map(f)` with `f` called once per distinct value: key and name columns repeat a few values over
    thousands of rows. Nulls count as one value (the formatters treat None and NaN alike)."""
    try:
        codes, uniques = pd.factorize(values, use_na_sentinel=False)
    except TypeError:  # unhashable values (lists): one call per row
        return values.map(f)
    mapped = [f(u) for u in uniques]
    return pd.Series([mapped[c] for c in codes.tolist()], index=values.index)


def fmt_value(x: object) -> str:
    """A key value of any type (depth, beta, variant, method_params) as table text."""
    if x is None or (not isinstance(x, str) and pd.isna(x)):
        return MISSING
    if isinstance(x, float):
        return fmt_num(x, 4)
    return str(x)


def fmt_int(x: object) -> str:
    """A count or length as an integer; anything that is not one (missing, '') as a dash."""
    try:
        return str(int(float(x)))
    except (TypeError, ValueError, OverflowError):
        return MISSING


def parse_params(text: object) -> dict:
    """A row's method_params (JSON text) as a dict; text that is not a JSON object as {'params': text}."""
    value = fmt_value(text)
    if value in DEFAULTS:
        return {}
    try:
        params = json.loads(value)
    except ValueError:
        return {"params": value}
    return params if isinstance(params, dict) else {"params": value}


def params_text(df: pd.DataFrame) -> pd.Series:
    """Each row's method parameters that differ between rows of its method here ('window=64'), else ''.

    A method's parameters matter to a reader only where one method ran with
    several sets; its defaults (the same in every row) are noise in a table.
    """
    out = pd.Series("", index=df.index, dtype=object)
    if PARAMS not in df.columns or df.empty:
        return out
    texts = map_distinct(df[PARAMS], fmt_value)
    methods = df["method"].astype(str)
    pairs = pd.DataFrame({"method": methods, "params": texts}).drop_duplicates()
    if not pairs["method"].duplicated().any():  # the usual case: one parameter set per method
        return out
    parsed = {t: parse_params(t) for t in pairs["params"].unique()}
    for _, rows in texts.groupby(methods, sort=False):
        sets = [parsed[t] for t in rows.unique()]
        if len(sets) < 2:
            continue
        names = list(dict.fromkeys(k for d in sets for k in d))
        varying = [k for k in names if len({json.dumps(d.get(k), sort_keys=True) for d in sets}) > 1]
        shown = {t: " ".join(f"{k}={_param(parsed[t].get(k))}" for k in varying) for t in rows.unique()}
        out[rows.index] = rows.map(shown)
    return out


def _param(v: object) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def varies(df: pd.DataFrame, key: str) -> bool:
    """Whether a key takes more than one value over these rows (parameters: within one method)."""
    if key == PARAMS:
        return bool(params_text(df).ne("").any())
    return key in df.columns and pd.Series(df[key].dropna().unique()).map(fmt_value).nunique() > 1


# ---------------------------------------------------------------- metrics


def shown_metric(metric: Metric, values: pd.Series | None = None) -> tuple[Metric, float]:
    """(the metric as displayed, divisor): byte counts in B, KiB, MiB or GiB by the column's typical (median)
    size, so 1 KiB of decode state does not read 9.54e-04 MiB; a unit the label states is not repeated."""
    if metric.unit == "bytes":
        sizes = pd.to_numeric(values, errors="coerce") if values is not None else pd.Series(dtype=float)
        typical = sizes[sizes > 0].median() if (sizes > 0).any() else MIB
        unit, divisor = next(((u, d) for u, d in reversed(BYTE_UNITS) if typical >= d), BYTE_UNITS[0])
        return dataclasses.replace(metric, unit=unit), float(divisor)
    if metric.unit and metric.unit in metric.label:  # 'TFLOP/s', '% of peak': the label already says it
        return dataclasses.replace(metric, unit=""), 1.0
    return metric, 1.0


def metric_header(metric: Metric, values: pd.Series | None = None) -> str:
    """'latency (ms) ↓', 'peak memory (MiB) ↓', 'hit rate ↑': label, displayed unit (for these values), direction."""
    return shown_metric(metric, values)[0].header


def fmt_metric(values: pd.Series, metric: Metric, like: pd.Series | None = None) -> pd.Series:
    """A metric column as text in its displayed unit (chosen for `like`, by default the values themselves);
    non-numeric values (a flag, a word) as they are."""
    numbers = pd.to_numeric(values, errors="coerce")
    _, divisor = shown_metric(metric, values if like is None else like)
    text = fmt_nums(numbers / divisor)
    words = numbers.isna() & values.notna()
    return text.where(~words, map_distinct(values, fmt_value)) if words.any() else text


def marked(text: pd.Series, mask: pd.Series) -> pd.Series:
    """The text with the disturbed mark after each value of a masked row (the mark follows the whole cell, spread
    included); an empty cell or a dash stays unmarked: there is no value to distrust."""
    mask = mask.reindex(text.index, fill_value=False).astype(bool) & ~text.isin(["", MISSING])
    return text.where(~mask, text + MARK)


def fmt_spread(df: pd.DataFrame, metric: Metric) -> pd.Series:
    """'1.23 [1.2–1.3]': the value with its p10–p90 spread where the row has one (tells a difference from noise)."""
    lo, hi = (f"{metric.name}{s}" for s in SPREAD)
    main = df[metric.name]
    text = fmt_metric(main, metric)
    spread = df[lo].notna() & df[hi].notna() & main.notna()
    return text + (" [" + fmt_metric(df[lo], metric, main) + "–" + fmt_metric(df[hi], metric, main) + "]").where(
        spread, ""
    )


# ---------------------------------------------------------------- sweep points


def _ints(s: pd.Series) -> pd.Series:
    return map_distinct(s, fmt_int)


def _pieces(df: pd.DataFrame, keys: Sequence[str], cross: pd.Series) -> list[pd.Series]:
    """One text Series per shown part of the point, in key order; empty strings where a row lacks the key."""
    parts: list[pd.Series] = []
    done: set[str] = set()
    for key in keys:
        if key in done or key not in df.columns:
            continue
        if key in SHAPE_TRIPLE:
            done.update(SHAPE_TRIPLE)
            cols = [df[c] if c in df.columns else pd.Series(None, index=df.index, dtype=object) for c in SHAPE_TRIPLE]
            known = cols[0].notna() & cols[1].notna() & cols[2].notna()
            text = "B×H×D=" + _ints(cols[0]) + "×" + _ints(cols[1]) + "×" + _ints(cols[2])
            parts.append(text.where(known, ""))
        elif key in CONTEXT:
            done.update(CONTEXT)
            q = df["seq_len"] if "seq_len" in df.columns else pd.Series(None, index=df.index, dtype=object)
            kv = df["kv_len"] if "kv_len" in df.columns else q
            self_text = ("N=" + _ints(kv)).where(kv.notna(), "")
            parts.append(self_text.where(~cross, "q=" + _ints(q) + " kv=" + _ints(kv)))
        elif key == PARAMS:
            done.add(key)
            parts.append(params_text(df))
        else:
            done.add(key)
            parts.append(map_distinct(df[key], lambda v, k=key: "" if fmt_value(v) in DEFAULTS else f"{k}={fmt_value(v)}"))
    return parts


def point_text(df: pd.DataFrame, keys: Sequence[str], sep: str = " · ") -> pd.Series:
    """The sweep point of each row on one line: 'N=1024 · B×H×D=1×8×64 · depth=0.25 · window=256'.

    Shape columns read as a unit (B×H×D; N, or q and kv for cross-attention),
    method parameters as the settings that differ within a method (`params_text`);
    keys a row does not have are left out.
    """
    cross = is_cross(df)
    text = pd.Series("", index=df.index, dtype=object)
    for piece in _pieces(df, keys, cross):
        text = text + map_distinct(piece, lambda p: f"{sep}{p}" if p else "")
    return text.str.slice(len(sep))


def is_cross(df: pd.DataFrame) -> pd.Series:
    """Cross-attention rows: queries and keys differ in length (decode, one query against a cache, is not)."""
    if "seq_len" not in df.columns or "kv_len" not in df.columns:
        return pd.Series(False, index=df.index)
    mode = df["mode"] if "mode" in df.columns else pd.Series("", index=df.index)
    known = df["seq_len"].notna() & df["kv_len"].notna()
    return known & df["seq_len"].ne(df["kv_len"]) & mode.ne("decode")


# ---------------------------------------------------------------- escaping and lists


def md_escape(s: pd.Series) -> pd.Series:
    """Cell text that cannot break a Markdown table: no pipes, no newlines."""
    return s.astype(str).str.replace("|", r"\|", regex=False).str.replace(r"[\r\n]+", " ", regex=True)


def md_table(cells: pd.DataFrame) -> str:
    """A Markdown table from a frame of strings, headed by its column names."""
    if cells.empty:
        return "_none_\n"
    header = "| " + " | ".join(md_escape(pd.Series(cells.columns)).tolist()) + " |"
    rule = "|" + "|".join("---" for _ in cells.columns) + "|"
    body = md_escape(cells.iloc[:, 0]).radd("| ")
    for col in cells.columns[1:]:
        body = body + " | " + md_escape(cells[col])
    return "\n".join([header, rule, *(body + " |")]) + "\n"


LATEX_SPECIAL = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}",
    "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "×": r"$\times$", "–": "--", "—": "---", "²": r"$^2$",
    "↑": r"$\uparrow$", "↓": r"$\downarrow$", "·": r"$\cdot$", "≥": r"$\geq$", MARK: r"$^{\dagger}$",
}  # fmt: skip


_TEX_TABLE = str.maketrans(LATEX_SPECIAL)  # one C pass per cell: a 10,000-row report escapes ~100,000 cells


def tex_escape(text: object) -> str:
    """Text safe inside a tabular cell (every LaTeX special character and the report's few non-ASCII ones)."""
    return str(text).translate(_TEX_TABLE)


def html_escape(text: object) -> str:
    return html.escape(str(text))


def listed(values: Iterable[str], most: int) -> tuple[list[str], int]:
    """(the first `most` meaningful values, how many more): a long campaign's provenance stays one line."""
    kept = [v for v in values if v not in ("", "None", "nan")]
    return kept[:most], max(0, len(kept) - most)


def file_slug(label: str) -> str:
    """A file-name-safe suffix from a label."""
    return re.sub(r"[^A-Za-z0-9.=_-]+", "_", label).strip("_") or "other"
