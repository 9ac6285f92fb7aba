"""The report: a summary that ranks every method and implementation, then leaderboard tables (Markdown, LaTeX,
HTML) and figures, from a results folder.

`python -m bench.report RESULTS_DIR [--out DIR] [--baseline softmax/sdpa]` writes into RESULTS_DIR/report/:
`leaderboard.md`, `leaderboard.tex` (booktabs), `index.html` (self-contained), `latency_vs_seq_len.png`,
`memory_vs_seq_len.png`, `pct_peak_vs_seq_len.png`, `efficiency_length.png`, `pareto_<task>.png`, and the
figures of each task's own sections.

The report reads declarations, never a task's name: rows name their key columns and declare their metrics
(unit, better direction, headline), and each registered task says what its summary columns, Pareto axes and
sections are. Rules it keeps, because a leaderboard that breaks them misleads:
- every row that is not `ok` is listed, with its reason, under "Not measured";
  an unreadable results file is listed there too, never silently skipped;
- rows run under the Triton CPU interpreter (`interpreted`) get their own
  tables, are left out of the summary and never appear in a figure: their
  latency says nothing about the kernel;
- rows from different hardware profiles, patterns, modes or dtypes are never
  in one table or on one line.

Modules, by job: `rows` (loading, grouping columns, declarations), `format` (numbers, headers, points,
escaping: shared by every renderer), `document` (the parts a report is made of), `summary`, `tables`,
`plots`, `pareto`, `slopes`, `efficiency`, the renderers `markdown`, `latex`, `html`, and `build`
(reading order, files, CLI).
"""

from bench.report.build import main, write_report
from bench.report.plots import LATENCY_PNG, MEMORY_PNG, PEAK_PNG
from bench.report.rows import NoResults

__all__ = ["LATENCY_PNG", "MEMORY_PNG", "PEAK_PNG", "NoResults", "main", "write_report"]
