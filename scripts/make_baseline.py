"""Build a regression baseline from several runs of one suite: per cell, the row of the run with the median latency.

Why: a single run on a busy machine has a few cells measured during a load
burst (2-3x slow). A baseline with such a cell makes every later run look
2-3x *faster* there, which hides a real slowdown of that cell and widens the
method-level interval. The per-cell median over three or more runs drops
those bursts; a row the interference probe flagged disturbed is used only when every run's row
of that cell was. Rows without latency (failures, accuracy-only tasks) come from
the first run that has the cell.

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
from bench.results import cell_path  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dst", type=Path, help="baseline folder to (re)write")
    parser.add_argument("runs", type=Path, nargs="+", help="results folders of the same suite")
    args = parser.parse_args(argv)
    frames = [load_side(r, str(r)) for r in args.runs]
    keys = key_columns(*frames)
    frames = [with_keys(f, keys) for f in frames]
    if args.dst.exists():
        shutil.rmtree(args.dst)
    args.dst.mkdir(parents=True)
    all_keys = sorted(set().union(*(f.index for f in frames)))
    for key in all_keys:
        candidates = [(run, f.loc[key]) for run, f in zip(args.runs, frames, strict=True) if key in f.index]
        timed = [(run, row) for run, row in candidates if row["status"] == "ok" and row["latency_ms"] == row["latency_ms"]]
        # A row the probe flagged disturbed would leave its cell unjudged in every later comparison.
        timed = [(run, row) for run, row in timed if not is_disturbed(row)] or timed
        if timed:
            order = np.argsort([float(row["latency_ms"]) for _, row in timed])
            run, row = timed[order[len(order) // 2]]
        else:
            run, row = candidates[0]
        shutil.copy2(cell_path(run, row["cell_id"]), args.dst / f"{row['cell_id']}.parquet")
    print(f"{len(all_keys)} cells from {len(args.runs)} runs -> {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
