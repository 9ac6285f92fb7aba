"""index.html: the leaderboard as one self-contained page (no CDN, no server; opens from a file, offline).

Inline CSS and JS, plots embedded as base64 PNG. Every table sorts by
clicking a header; the leaderboard filters by task, pattern and dtype; every
row carries its cell_id (a column, an anchor `#cell-<id>` and a title on each
number), so any number leads back to the Parquet file it came from.
Interpreted-kernel rows get their own table, never mixed with compiled ones.

Test hook: `index.html?test-sort=N` clicks header N of the leaderboard on load
and writes the first row's cells (and the visible row count) into
`<pre id="test-result">`, so a headless browser's --dump-dom can check
sorting without a driver.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from bench import report

CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:12px}
th,td{border-bottom:1px solid #ddd;padding:2px 6px;text-align:left;white-space:nowrap}
td.n{text-align:right;font-variant-numeric:tabular-nums}
th{cursor:pointer;background:#f4f4f4;position:sticky;top:0}
th.asc::after{content:" ▲"}th.desc::after{content:" ▼"}
tr:target{background:#fff3b0}
a{color:inherit;text-decoration:none}a:hover{text-decoration:underline}
.filters select{margin-right:1em}
img{max-width:100%;border:1px solid #eee;margin:.3em 0}
.note{color:#666;font-size:12px}
"""

JS = r"""
function cellValue(tr, i){
  var td = tr.children[i]; if(!td) return '';
  var v = td.getAttribute('data-v');
  if(v !== null && v !== '') return parseFloat(v);
  return td.textContent.trim();
}
function sortTable(th){
  var table = th.closest('table'), tbody = table.tBodies[0];
  var i = Array.prototype.indexOf.call(th.parentNode.children, th);
  var asc = !th.classList.contains('asc');
  Array.prototype.forEach.call(th.parentNode.children, function(h){h.classList.remove('asc','desc');});
  th.classList.add(asc ? 'asc' : 'desc');
  var rows = Array.prototype.slice.call(tbody.rows);
  rows.sort(function(a, b){
    var x = cellValue(a, i), y = cellValue(b, i);
    var xn = typeof x === 'number' && !isNaN(x), yn = typeof y === 'number' && !isNaN(y);
    var r;
    if(xn && yn) r = x - y; else if(xn) r = -1; else if(yn) r = 1; else r = String(x).localeCompare(String(y));
    return asc ? r : -r;
  });
  rows.forEach(function(r){tbody.appendChild(r);});
}
function applyFilters(){
  var f = {};
  document.querySelectorAll('.filters select').forEach(function(s){f[s.name] = s.value;});
  document.querySelectorAll('table.lb tbody tr').forEach(function(tr){
    var show = true;
    for(var k in f){ if(f[k] && tr.getAttribute('data-' + k) !== f[k]) show = false; }
    tr.style.display = show ? '' : 'none';
  });
}
document.addEventListener('DOMContentLoaded', function(){
  document.querySelectorAll('table.sortable th').forEach(function(th){
    th.addEventListener('click', function(){sortTable(th);});
  });
  document.querySelectorAll('.filters select').forEach(function(s){s.addEventListener('change', applyFilters);});
  var m = /[?&]test-sort=(\d+)/.exec(location.search);
  if(m){
    var table = document.getElementById('leaderboard');
    var th = table.tHead.rows[0].children[parseInt(m[1], 10)];
    th.click();
    var m2 = /[?&]test-desc=1/.exec(location.search); if(m2) th.click();
    var first = table.tBodies[0].rows[0];
    var cells = Array.prototype.map.call(first.children, function(td){return td.textContent.trim();});
    var visible = Array.prototype.filter.call(table.tBodies[0].rows, function(r){return r.style.display !== 'none';});
    document.getElementById('test-result').textContent =
      'first-row: ' + cells.join(' | ') + '\nrows: ' + visible.length + '\nsorted: ' + th.className;
  }
});
"""

# (column, header, numeric)
COLUMNS: tuple[tuple[str, str, bool], ...] = (
    ("_task", "task", False), ("method", "method", False), ("impl", "impl", False), ("_pattern", "pattern", False),
    ("_mode", "mode", False), ("_dtype", "dtype", False), ("_bhd", "B×H×D", False), ("seq_len", "q", True),
    ("kv_len", "kv", True), ("_keys", "keys", False), ("latency_ms", "latency ms", True),
    ("latency_ms_p10", "p10", True), ("latency_ms_p90", "p90", True), ("tflops", "TFLOP/s", True),
    ("pct_peak", "% peak", True), ("_mem_mib", "peak MiB", True), ("fidelity_rel", "fidelity (rel)", True),
    ("accuracy", "accuracy", True), ("cell_id", "cell_id", False),
)  # fmt: skip

e = html.escape


def num_text(col: str, v: object) -> str:
    if col == "fidelity_rel":
        return report.fmt_sci(v)
    if col in ("seq_len", "kv_len"):
        return report.MISSING if pd.isna(v) else str(int(v))
    if col == "pct_peak":
        return report.MISSING if pd.isna(v) else f"{float(v):.1f}"
    return report.fmt_num(v)


def table_frame(df: pd.DataFrame) -> pd.DataFrame:
    """The leaderboard's columns, derived from the prepared frame."""
    if df.empty:  # every cell failed: an empty table, the failures are listed below it
        return df.assign(**{c: pd.Series(dtype=object) for c, _, _ in COLUMNS if c not in df.columns})
    keys = [k for k in report.extra_keys(df) if df[k].map(report.fmt_value).nunique() > 1]
    df = df.assign(
        _bhd=report.shape_text(df),
        _mem_mib=df["peak_mem_bytes"] / report.MIB,
        _keys=report.joined_labels(df, keys) if keys else "",
    )
    for col, _, _ in COLUMNS:
        if col not in df.columns:
            df[col] = None
    return df


def leaderboard_table(df: pd.DataFrame, table_id: str) -> str:
    """One sortable, filterable table; each row is anchored by its cell_id, each number links to it."""
    head = "".join(f"<th>{e(h)}</th>" for _, h, _ in COLUMNS)
    body = []
    for row in df[[c for c, _, _ in COLUMNS]].itertuples(index=False):
        rec = dict(zip([c for c, _, _ in COLUMNS], row, strict=True))
        cid = e(str(rec["cell_id"]))
        tds = []
        for col, _, numeric in COLUMNS:
            v = rec[col]
            if numeric:
                val = "" if pd.isna(v) else repr(float(v))
                tds.append(f'<td class="n" data-v="{val}" title="cell {cid}"><a href="#cell-{cid}">'
                           f"{e(num_text(col, v))}</a></td>")  # fmt: skip
            elif col == "cell_id":
                tds.append(f'<td title="results file {cid}.parquet"><a href="#cell-{cid}">{cid}</a></td>')
            else:
                tds.append(f"<td>{e(report.fmt_value(v))}</td>")
        attrs = f'id="cell-{cid}" data-task="{e(str(rec["_task"]))}" data-pattern="{e(str(rec["_pattern"]))}" ' \
                f'data-dtype="{e(str(rec["_dtype"]))}"'  # fmt: skip
        body.append(f"<tr {attrs}>{''.join(tds)}</tr>")
    return (f'<table id="{table_id}" class="sortable lb"><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table>")  # fmt: skip


def md_to_html(text: str) -> str:
    """The few Markdown shapes the report's sections use (headings, tables, paragraphs) as HTML; tables sortable."""
    out, table = [], []

    def flush() -> None:
        if not table:
            return
        rows = [[c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", r.strip().strip("|"))] for r in table]
        head, body = rows[0], [r for r in rows[2:]]
        out.append('<table class="sortable"><thead><tr>' + "".join(f"<th>{e(h)}</th>" for h in head)
                   + "</tr></thead><tbody>"
                   + "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in body)
                   + "</tbody></table>")  # fmt: skip
        table.clear()

    for line in text.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush()
        if m := re.match(r"^(#{1,4}) (.*)", line):
            level = min(len(m.group(1)) + 1, 5)
            out.append(f"<h{level}>{e(m.group(2))}</h{level}>")
        elif line.strip() and not line.startswith("!["):
            out.append(f"<p>{e(line)}</p>")
    flush()
    return "\n".join(out)


def image_tag(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<figure><img alt="{e(path.stem)}" src="data:image/png;base64,{data}"><figcaption class="note">' \
           f"{e(path.name)}</figcaption></figure>"  # fmt: skip


def options(values: Sequence[str]) -> str:
    return "".join(f'<option value="{e(v)}">{e(v)}</option>' for v in sorted(set(values)) if v)


def write_html(
    df: pd.DataFrame, path: Path, provenance_md: str, not_measured_md: str, sections_md: Sequence[str],
    plots: Sequence[Path],
) -> Path:  # fmt: skip
    """Write index.html from the prepared frame, the Markdown sections and the PNG files."""
    ok = table_frame(df[df["status"].eq("ok")])
    compiled, interp = ok[~ok["_interp"]], ok[ok["_interp"]]
    order = ["_task", "_pattern", "_mode", "_dtype", "kv_len", "method", "impl"]
    compiled = compiled.sort_values(order, kind="stable", na_position="last")
    parts = [
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>",
        "<meta name=viewport content='width=device-width,initial-scale=1'><title>attnbench leaderboard</title>",
        f"<style>{CSS}</style><script>{JS}</script></head><body>",
        "<h1>attnbench leaderboard</h1>",
        md_to_html(provenance_md),
        '<h2>Leaderboard</h2><p class="note">Click a header to sort. Hover a number for its cell_id; '
        "each number links to its row (#cell-ID), the cell_id names the results file.</p>",
        '<div class="filters">'
        f'task <select name="task"><option value="">all</option>{options(ok["_task"])}</select>'
        f'pattern <select name="pattern"><option value="">all</option>{options(ok["_pattern"])}</select>'
        f'dtype <select name="dtype"><option value="">all</option>{options(ok["_dtype"])}</select></div>',
        leaderboard_table(compiled, "leaderboard"),
    ]
    if not interp.empty:
        parts += [
            "<h2>Triton CPU interpreter rows</h2><p class=note>Correctness runs: their latency says nothing about "
            "the kernel and is not comparable with the compiled rows above.</p>",
            leaderboard_table(interp.sort_values(order, kind="stable"), "interpreted"),
        ]
    parts += [md_to_html(s) for s in sections_md if s]
    parts.append(md_to_html(not_measured_md))
    if plots:
        parts.append("<h2>Plots</h2>")
        parts += [image_tag(p) for p in plots if p.exists()]
    parts.append('<pre id="test-result"></pre></body></html>')
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
