"""index.html: the report as one self-contained page (no CDN, no server; opens from a file, offline).

Inline CSS and JS, plots embedded as base64 PNG. The summary table comes
first; every table sorts by clicking a header; the per-cell tables are folded
(`<details>`) and filter by task, pattern and dtype; every per-cell row carries
its cell_id (a column, an anchor `#cell-<id>` that unfolds its table, and a
title on each number), so any number leads back to the Parquet file it came from.

Test hook: `index.html?test-sort=N[&test-desc=1][&test-table=ID]` clicks header
N of table ID (default: the summary) on load and writes the first row's cells,
the visible row count and the header's sort state into `<pre id="test-result">`,
so a headless browser's --dump-dom can check sorting without a driver.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from bench.report.document import Item, Part, Table
from bench.report.format import html_escape as e
from bench.report.format import map_distinct

CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;max-width:1400px}
table{border-collapse:collapse;margin:.3em 0 1.2em;font-size:12px}
th,td{border-bottom:1px solid #ddd;padding:2px 6px;text-align:left;vertical-align:top}
td{white-space:nowrap}td.k{white-space:normal;min-width:8em;max-width:22em}
th{cursor:pointer;background:#f4f4f4;position:sticky;top:0;white-space:normal;max-width:16em;font-weight:600}
td.n{text-align:right;font-variant-numeric:tabular-nums}
th.asc::after{content:" ▲"}th.desc::after{content:" ▼"}
tr:target{background:#fff3b0}
a{color:inherit;text-decoration:none}a:hover{text-decoration:underline}
details{margin:.2em 0}summary{cursor:pointer}summary h3{display:inline;font-size:15px}
.filters{margin:.5em 0 1em}.filters select{margin-right:1em}
img{max-width:100%;border:1px solid #eee;margin:.3em 0}
.note{color:#555;font-size:12px;margin:.2em 0}
ul.prov{font-size:12px;color:#444}code{font-size:12px}
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
  document.querySelectorAll('table.lb').forEach(function(table){
    var shown = 0;
    Array.prototype.forEach.call(table.tBodies[0].rows, function(tr){
      var show = true;
      for(var k in f){ if(f[k] && tr.getAttribute('data-' + k) !== f[k]) show = false; }
      tr.style.display = show ? '' : 'none'; if(show) shown++;
    });
    var box = table.closest('details'); if(box) box.style.display = shown ? '' : 'none';
  });
}
function openTarget(){
  var el = location.hash ? document.getElementById(location.hash.slice(1)) : null;
  var box = el ? el.closest('details') : null;
  if(box){ box.open = true; el.scrollIntoView(); }
}
document.addEventListener('DOMContentLoaded', function(){
  document.querySelectorAll('table.sortable th').forEach(function(th){
    th.addEventListener('click', function(){sortTable(th);});
  });
  document.querySelectorAll('.filters select').forEach(function(s){s.addEventListener('change', applyFilters);});
  window.addEventListener('hashchange', openTarget); openTarget();
  var m = /[?&]test-sort=(\d+)/.exec(location.search);
  if(m){
    var id = (/[?&]test-table=([\w-]+)/.exec(location.search) || [0, 'summary'])[1];
    var table = document.getElementById(id);
    var th = table.tHead.rows[0].children[parseInt(m[1], 10)];
    th.click();
    if(/[?&]test-desc=1/.test(location.search)) th.click();
    var first = table.tBodies[0].rows[0];
    var cells = Array.prototype.map.call(first.children, function(td){return td.textContent.trim();});
    var visible = Array.prototype.filter.call(table.tBodies[0].rows, function(r){return r.style.display !== 'none';});
    document.getElementById('test-result').textContent =
      'first-row: ' + cells.join(' | ') + '\nrows: ' + visible.length + '\nsorted: ' + th.className;
  }
});
"""
FILTERS = ("task", "pattern", "dtype")


def inline(text: str) -> str:
    """Escaped text with the report's two inline marks: `code` and *emphasis*."""
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", e(text))
    return re.sub(r"\*([^*\s][^*]*)\*", r"<em>\1</em>", text)


def item_html(item: Item) -> str:
    values = ", ".join(f"<code>{e(v)}</code>" if item.code else e(v) for v in item.values) or "–"
    more = f" (+{item.more} more)" if item.more else ""
    return f"<li><strong>{e(item.label)}</strong>: {values}{more}</li>"


def number(v: object) -> str:
    return "" if v is None or pd.isna(v) else repr(float(v))


def numbers(values: np.ndarray) -> list[str]:
    """`number` of a column at once (a 100,000-row report has over half a million sort keys)."""
    try:
        return ["" if v != v else repr(v) for v in values.astype(float).tolist()]
    except (TypeError, ValueError):
        return [number(v) for v in values]


def table_html(table: Table) -> str:
    """A sortable table; rows of a per-cell table are anchored by their cell_id and each number links to it.

    Built a column at a time (escaping, sort keys, links), then joined row by row: the same text as a cell-by-cell
    loop at a fraction of the calls.
    """
    cols = list(table.cells.columns)
    keyed = table.sort_keys if table.sort_keys is not None else pd.DataFrame(index=table.cells.index)
    ids = table.cell_ids
    head = "".join(f"<th>{e(c)}</th>" for c in cols) + ("<th>cell_id</th>" if ids is not None else "")
    n = len(table.cells)
    id_text = [""] * n if ids is None else [e(x) for x in ids]
    columns = []
    for c, col in enumerate(cols):
        shown = [e(x) for x in table.cells.iloc[:, c].to_numpy(dtype=object)]
        if col in keyed.columns and col in table.numeric:
            data = numbers(keyed[col].to_numpy())
            columns.append([f'<td class="n" data-v="{v}" title="cell {cid}"><a href="#cell-{cid}">{t}</a></td>' if cid
                            else f'<td class="n" data-v="{v}">{t}</td>'
                            for t, v, cid in zip(shown, data, id_text, strict=True)])  # fmt: skip
        elif col in keyed.columns:  # text that sorts by its own order (a point: 1024 before 16384)
            data = numbers(keyed[col].to_numpy())
            columns.append([f'<td class="k" data-v="{v}">{t}</td>' for t, v in zip(shown, data, strict=True)])
        else:
            columns.append([f"<td>{t}</td>" for t in shown])
    if ids is not None:
        columns.append([f'<td title="results file {cid}.parquet"><a href="#cell-{cid}">{cid}</a></td>' if cid else ""
                        for cid in id_text])  # fmt: skip
    attrs = [] if table.attrs is None else [[f' data-{k}="{v}"' for v in map_distinct(table.attrs[k], e)]
                                            for k in table.attrs.columns]  # fmt: skip
    marks = [f' id="cell-{cid}"' if cid else "" for cid in id_text]
    row_attrs = zip(*attrs, strict=True) if attrs else [()] * n
    row_cells = zip(*columns, strict=True) if columns else [()] * n
    body = ["<tr" + mark + "".join(a) + ">" + "".join(tds) + "</tr>"
            for mark, a, tds in zip(marks, row_attrs, row_cells, strict=True)]  # fmt: skip
    cls = "sortable lb" if ids is not None else "sortable"
    ident = f' id="{e(table.id)}"' if table.id else ""
    caption = f'<p class="note">{inline(table.caption)}</p>' if table.caption else ""
    note = f'<p class="note">{inline(table.note)}</p>' if table.note else ""
    return (f'{caption}<table{ident} class="{cls}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody>'
            f"</table>{note}")  # fmt: skip


def image_tag(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<figure><img alt="{e(path.stem)}" src="data:image/png;base64,{data}"><figcaption class="note">' \
           f"{e(path.name)}</figcaption></figure>"  # fmt: skip


def part_html(part: Part) -> str:
    level = min(part.level, 4)
    body = [f"<p>{inline(t)}</p>" for t in part.text]
    if part.items:
        body.append('<ul class="prov">' + "".join(item_html(i) for i in part.items) + "</ul>")
    body += [table_html(t) for t in part.tables]
    body += [image_tag(p) for p in part.figures if p.exists()]
    if part.collapsible:
        rows = sum(len(t.cells) for t in part.tables)
        return (f"<details><summary><h{level}>{e(part.title)}</h{level}> <span class=note>({rows} rows)</span>"
                f"</summary>{''.join(body)}</details>")  # fmt: skip
    return f"<h{level}>{e(part.title)}</h{level}>" + "".join(body)


def options(values: Sequence[str]) -> str:
    return "".join(f'<option value="{e(v)}">{e(v)}</option>' for v in sorted(set(values)) if v)


def filters_html(parts: list[Part]) -> str:
    """Selects over the per-cell rows' task, pattern and dtype."""
    attrs = [t.attrs for p in parts for t in p.tables if t.attrs is not None]
    values = {k: [str(v) for a in attrs if k in a.columns for v in a[k].unique()] for k in FILTERS}
    selects = "".join(f'{k} <select name="{k}"><option value="">all</option>{options(values[k])}</select>'
                      for k in FILTERS)  # fmt: skip
    return ('<div class="filters"><span class="note">Per-cell tables (click a heading to unfold, a header to sort; '
            f"each number links to its row, whose cell_id names the results file):</span><br>{selects}</div>")  # fmt: skip


def render_html(title: str, parts: list[Part], lead: Sequence[str] = ()) -> str:
    """The page: the lead lines under the title, the parts in order, the filters just before the first per-cell
    table."""
    out = [
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>",
        f"<meta name=viewport content='width=device-width,initial-scale=1'><title>{e(title)}</title>",
        f"<style>{CSS}</style><script>{JS}</script></head><body>",
        f"<h1>{e(title)}</h1>",
        *(f'<p class="lead">{inline(line)}</p>' for line in lead),
    ]
    cell_parts = [i for i, p in enumerate(parts) if any(t.cell_ids is not None for t in p.tables)]
    at = cell_parts[0] if cell_parts else -1
    if at > 0 and parts[at - 1].level < parts[at].level and not parts[at - 1].tables:
        at -= 1  # above the heading the per-cell tables sit under
    for i, part in enumerate(parts):
        if i == at:
            out.append(filters_html(parts))
        out.append(part_html(part))
    out.append('<pre id="test-result"></pre></body></html>')
    return "\n".join(out)
