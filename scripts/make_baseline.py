"""Build a regression baseline from several runs of one suite: per cell, the row of the run with the median latency.

Why: a single run on a busy machine has a few cells measured during a load
burst (2-3x slow). A baseline with such a cell makes every later run look
2-3x *faster* there, which hides a real slowdown of that cell and widens the
method-level interval. The per-cell median over three or more runs drops
those bursts; a row the interference probe flagged disturbed is used only when every run's row
of that cell was. Rows without latency (failures, accuracy-only tasks) come from
the first run that has the cell. The baseline is written as one compacted file (`bench.results.write_compacted`):
a committed folder of one file per cell is hundreds of files to diff and slow to read.

    python scripts/make_baseline.py results/baselines/cpu-smoke /tmp/run0 /tmp/run1 /tmp/run2
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.compare import load_side, with_keys  # noqa: E402
from bench.declarations import key_columns  # noqa: E402
from bench.disturbed import is_disturbed  # noqa: E402
from bench.results import read_rows, write_compacted  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dst", type=Path, help="baseline folder to (re)write")
    parser.add_argument("runs", type=Path, nargs="+", help="results folders of the same suite")
    args = parser.parse_args(argv)
    frames = [load_side(r, str(r)) for r in args.runs]
    keys = key_columns(*frames)
    frames = [with_keys(f, keys) for f in frames]
    all_keys = sorted(set().union(*(f.index for f in frames)))
    chosen: list[tuple[int, str]] = []  # (run, cell_id) per cell
    for key in all_keys:
        candidates = [(i, f.loc[key]) for i, f in enumerate(frames) if key in f.index]
        timed = [(i, row) for i, row in candidates if row["status"] == "ok" and row["latency_ms"] == row["latency_ms"]]
        # A row the probe flagged disturbed would leave its cell unjudged in every later comparison.
        timed = [(i, row) for i, row in timed if not is_disturbed(row)] or timed
        if timed:
            order = np.argsort([float(row["latency_ms"]) for _, row in timed])
            i, row = timed[order[len(order) // 2]]
        else:
            i, row = candidates[0]
        chosen.append((i, row["cell_id"]))
    # The rows as written (every column, its own types), whether each run is loose files or compacted.
    rows = [{r["cell_id"]: r for r in read_rows(run)} for run in args.runs]
    if args.dst.exists():
        shutil.rmtree(args.dst)
    write_compacted(args.dst, [rows[i][cell_id] for i, cell_id in chosen])
    print(f"{len(all_keys)} cells from {len(args.runs)} runs -> {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
