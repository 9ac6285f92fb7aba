"""Build the report from a results folder: the parts in reading order, then each rendering and the figures.

Reading order: a lead line on timing (how many timed rows the interference probe
found disturbed, and how they are marked), the summary (one ranked row per method
and impl: the promise), provenance, the per-cell tables by task, each task's own
sections, scaling slopes and efficiency length, Not measured, and the figures.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from bench.report.background import FigureDrawer
from bench.report.document import Part, section_part
from bench.report.efficiency import BASELINE, EFFICIENCY_PNG, efficiency_lengths, efficiency_part, efficiency_plot
from bench.report.html import render_html
from bench.report.latex import render_latex
from bench.report.markdown import render_markdown
from bench.report.pareto import pareto_plots
from bench.report.plots import context_plots, plots_part
from bench.report.rows import NoResults, context_rows, load_results, prepare
from bench.report.slopes import slopes_part
from bench.report.summary import summarise, summary_parts
from bench.report.tables import cell_parts, not_measured_part, provenance_part, timing_line
from tasks import TASKS

TITLE = "attnbench leaderboard"


def task_parts(df: pd.DataFrame, out: Path) -> list[Part]:
    """Each registered task's own sections (`Task.report_sections`), from its rows of every status, then each
    section group's shared sections (`Task.group_sections`) from the rows of all its tasks.

    A task whose section fails on these rows (rows of an older version of the task) gets a part that says
    so, with the error, rather than stopping the whole report.
    """
    parts: list[Part] = []
    groups: dict[str, list[str]] = {}
    for task in sorted(df["_task"].unique()):
        if task not in TASKS:
            continue
        if TASKS[task].section_group:
            groups.setdefault(TASKS[task].section_group, []).append(task)
        parts += sections_of(task, lambda rows, t=task: TASKS[t].report_sections(rows, out), df[df["_task"] == task])
    for group, tasks in groups.items():
        rows = df[df["_task"].isin(tasks)]
        parts += sections_of(group, lambda rows, t=tasks[0]: TASKS[t].group_sections(rows, out), rows)
    return parts


def sections_of(name: str, make, rows: pd.DataFrame) -> list[Part]:
    """The parts of one task's (or group's) sections; a part that says so when its code fails on these rows."""
    rows = rows.drop(columns=[c for c in rows.columns if c.startswith("_")])
    try:
        return [section_part(s) for s in make(rows)]
    except Exception as err:  # a task's code on old rows: say so, keep the rest of the report
        return [Part(f"{name}: section not drawn", text=[f"{type(err).__name__}: {err}".splitlines()[0]])]


def report_parts(df: pd.DataFrame, results_dir: Path, out: Path, corrupt: list[tuple[str, str]],
                 baseline: tuple[str, str], drawer: FigureDrawer | None = None) -> list[Part]:  # fmt: skip
    """Every part of the report in reading order; writes the figures into `out` on the way.

    With a `drawer` (entered: `background.draw` hands it the figures), the context-length figures go to a
    child first, then the task sections' figures to a second, while this process builds the rest; they are
    on disk once `drawer.finish()` returns.
    """
    summaries, notes = summarise(df)
    n_interp = int((df["status"].eq("ok") & df["_interp"]).sum())
    context = context_rows(df)  # once: plots, slopes and efficiency all read these rows
    figures, not_drawn = context_plots(context, out)
    if drawer is not None:
        drawer.start(len(context))
    tasks = task_parts(df, out)
    if drawer is not None:
        drawer.start(len(df))
    eff = efficiency_lengths(context, baseline)
    efficiency = efficiency_part(eff, baseline)
    if efficiency is not None and (png := efficiency_plot(eff, out / EFFICIENCY_PNG, baseline)) is not None:
        efficiency.figures.append(png)
    return [
        *summary_parts(summaries, notes, n_interp),
        provenance_part(df, results_dir, len(corrupt)),
        *cell_parts(df),
        *tasks,
        *(p for p in (slopes_part(context), efficiency) if p is not None),
        not_measured_part(df, corrupt),
        plots_part([*figures, *pareto_plots(summaries, out)], not_drawn),
    ]


def write_report(
    results_dir: Path | str, out_dir: Path | str | None = None, baseline: tuple[str, str] = BASELINE
) -> Path:
    """Write leaderboard.md/.tex, index.html and the figures; returns the leaderboard's path.

    NoResults when there is nothing to report. `baseline` is the method/impl the efficiency length is measured
    against.
    """
    results_dir = Path(results_dir)
    raw, corrupt = load_results(results_dir)
    df = prepare(raw)
    default = (results_dir if results_dir.is_dir() else results_dir.parent) / "report"
    out = Path(out_dir) if out_dir is not None else default
    out.mkdir(parents=True, exist_ok=True)
    with FigureDrawer() as drawer:
        parts = report_parts(df, results_dir, out, corrupt, baseline, drawer)
        lead = [timing_line(df)]
        path = out / "leaderboard.md"
        path.write_text(render_markdown(TITLE, parts, lead), encoding="utf-8")
        (out / "leaderboard.tex").write_text(render_latex(parts, lead), encoding="utf-8")
        drawer.finish()  # index.html embeds the figures
    (out / "index.html").write_text(render_html(TITLE, parts, lead), encoding="utf-8")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: 0 on success, 2 with a one-line message when there is nothing to report."""
    parser = argparse.ArgumentParser(prog="python -m bench.report",
                                     description="Write the leaderboard (Markdown, LaTeX, HTML) and plots.")  # fmt: skip
    parser.add_argument("results_dir", type=Path, help="folder of results (searched recursively)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: RESULTS_DIR/report)")
    parser.add_argument("--baseline", default="/".join(BASELINE), metavar="METHOD/IMPL",
                        help="what the efficiency length is measured against (default softmax/sdpa)")  # fmt: skip
    args = parser.parse_args(argv)
    method, _, impl = args.baseline.partition("/")
    try:
        path = write_report(args.results_dir, args.out, (method, impl or BASELINE[1]))
    except NoResults as err:
        print(f"error: {err.code}", file=sys.stderr)
        return 2
    print(f"report written to {path}")
    return 0
