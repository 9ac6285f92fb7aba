"""Copy a results folder and inject a known regression, to prove `bench.compare` catches it.

Post-processing a copy rather than a hook in the runner keeps product code
free of test switches: `--slowdown METHOD=FACTOR` multiplies the method's
latency samples (and medians, p10, p90), `--fidelity METHOD=FACTOR` its
relative error, `--accuracy METHOD=DELTA` subtracts from its accuracy, and
`--fail METHOD` turns its ok rows into `error` rows.

    python scripts/inject_regression.py results/baselines/cpu-smoke /tmp/slow --slowdown linear=2
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.results import read_rows, write_row  # noqa: E402


def pairs(values: list[str]) -> dict[str, float]:
    return {k: float(v) for k, v in (x.split("=", 1) for x in values)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path)
    parser.add_argument("dst", type=Path)
    parser.add_argument("--slowdown", action="append", default=[], metavar="METHOD=FACTOR")
    parser.add_argument("--fidelity", action="append", default=[], metavar="METHOD=FACTOR")
    parser.add_argument("--accuracy", action="append", default=[], metavar="METHOD=DELTA")
    parser.add_argument("--fail", action="append", default=[], metavar="METHOD")
    args = parser.parse_args(argv)
    slow, fid, acc = pairs(args.slowdown), pairs(args.fidelity), pairs(args.accuracy)
    if args.dst.exists():
        shutil.rmtree(args.dst)
    shutil.copytree(args.src, args.dst, ignore=shutil.ignore_patterns("report"))
    changed = 0
    # Every row, loose or compacted; a changed row is written loose, which `load` reads over its compacted copy.
    for row in read_rows(args.dst):
        method = row["method"]
        if row["status"] != "ok" or method not in {*slow, *fid, *acc, *args.fail}:
            continue
        if method in slow:
            f = slow[method]
            for col in ("latency_ms", "latency_ms_p10", "latency_ms_p90"):
                row[col] = row[col] * f if row[col] is not None else None
            row["latency_samples_ms"] = [x * f for x in (row["latency_samples_ms"] or [])]
        if method in fid and row.get("fidelity_rel") is not None:
            row["fidelity_rel"] *= fid[method]
        if method in acc and row.get("accuracy") is not None:
            row["accuracy"] -= acc[method]
        if method in args.fail:
            row["status"], row["reason"] = "error", "RuntimeError: injected failure"
        write_row(args.dst, row)
        changed += 1
    print(f"{changed} rows changed in {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
