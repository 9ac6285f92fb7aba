"""Write N synthetic result rows (through `bench.results`, as the runner writes them) to time loading and the report.

The rows look like a large GPU campaign: 20 methods x 3 impls, 9 context
lengths, 4 patterns x 4 modes, 3 dtypes, several head dims, a sprinkle of
failed and interpreted rows, and needle rows, with latency following a power
law so plots, slopes and efficiency lengths have real curves. Every row names
its key columns and declares its task's metrics, as the runner writes them.

    python scripts/synthetic_results.py /tmp/synth10k --rows 10000             # one file per row (write_row)
    python scripts/synthetic_results.py /tmp/synth100k --rows 100000 --compact  # one compacted file

`--compact` writes the rows straight into the folder's compacted file (`write_compacted`, the same row checks
and types as `write_row`): 100,000 loose files take minutes to write and as long again to compact.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.results import CORE_COLUMNS, write_compacted, write_row  # noqa: E402
from bench.sweep import metric_declarations  # noqa: E402
from tasks import get_task  # noqa: E402
from tasks.base import SHAPE_KEYS  # noqa: E402

METHODS = [f"method{i:02d}" for i in range(19)] + ["softmax"]
IMPLS = ["reference", "triton", "sdpa"]
LENGTHS = [2**k for k in range(9, 18)]
PATTERNS = [(True, False), (False, False), (True, True), (False, True)]  # (causal, cross)
MODES = ["fwd", "bwd", "fwd_bwd", "decode"]
DTYPES = ["float16", "bfloat16", "float32"]
HEAD_DIMS = [64, 128]
NEEDLE_DEPTHS = [0.0, 0.25, 0.5, 0.75, 1.0]
NEEDLE_LENGTHS = [4096, 16384]


METRICS: dict[str, str] = {}  # task -> its metric declarations (JSON), made once


def declarations(task: str, row: dict) -> dict:
    """The row's `keys` and `metrics`, as the runner writes them: rows describe themselves."""
    spec = get_task(task)
    keys = [*SHAPE_KEYS, *(k for k in spec.keys if row.get(k) is not None), "method_params"]
    return {"keys": keys, "metrics": METRICS.setdefault(task, metric_declarations(spec))}


def rows(n: int, seed: int = 0):
    """n rows: 98% scaling over the full grid, 2% needle (each method's reference, depth x length, as it is run)."""
    rng = np.random.default_rng(seed)
    n_needle = n // 50
    needle = itertools.cycle(itertools.product(METHODS, NEEDLE_DEPTHS, NEEDLE_LENGTHS))
    grid = itertools.chain(
        itertools.product(DTYPES, HEAD_DIMS, MODES, PATTERNS, METHODS, IMPLS, LENGTHS),
        itertools.cycle(itertools.product(DTYPES, HEAD_DIMS, MODES, PATTERNS, METHODS, IMPLS, LENGTHS)),
    )
    for i, (dtype, d, mode, (causal, cross), method, impl, kv) in enumerate(grid):
        if i >= n:
            return
        task = "scaling"  # cross-attention rows keep a fixed 1024-query block while kv grows
        depth = None
        if i < n_needle:
            method, depth, kv = next(needle)
            task, impl, dtype, d, mode, causal, cross = "needle", "reference", "float16", 64, "fwd", True, False
        power = 2.0 if method == "softmax" else 1.0 + (hash(method) % 10) / 10
        lat = 1e-4 * kv**power / (1 + IMPLS.index(impl)) * (d / 64)
        samples = (lat * rng.lognormal(0, 0.05, 10)).tolist()
        status = "ok" if rng.random() > 0.05 else str(rng.choice(["oom", "unsupported", "error", "timeout"]))
        accuracy = round(float(rng.uniform()) * 16) / 16
        row = dict.fromkeys(CORE_COLUMNS)
        row.update(
            run_id="synthetic", cell_id=f"c{i:06d}-{task}", method=method, impl=impl, family="x", task=task, suite="synthetic",
            hardware="h100_sxm", device="NVIDIA H100 80GB HBM3", dtype=dtype, batch=1, heads=16,
            seq_len=1 if mode == "decode" else (1024 if cross else kv), kv_len=kv, head_dim=d, causal=causal,
            mode=mode, status=status, reason="" if status == "ok" else f"{status}: synthetic",
            latency_ms=float(np.median(samples)) if status == "ok" else None,
            latency_ms_p10=float(np.percentile(samples, 10)) if status == "ok" else None,
            latency_ms_p90=float(np.percentile(samples, 90)) if status == "ok" else None,
            latency_samples_ms=samples if status == "ok" else None,
            peak_mem_bytes=int(kv * d * 64 * (kv / 1024 if method == "softmax" and impl == "reference" else 1)),
            flops=int(4 * kv * kv * d), tflops=float(rng.uniform(10, 500)), pct_peak=float(rng.uniform(1, 70)),
            fidelity_max_abs=float(rng.uniform(1e-4, 1e-2)), fidelity_rel=float(rng.uniform(1e-4, 1e-2)),
            accuracy=float(accuracy) if task == "needle" else None,
            hits=int(accuracy * 16) if task == "needle" else None, trials=16 if task == "needle" else None,
            git_commit="0" * 40, git_dirty=False, torch_version="2.13.0", triton_version="3.7.1",
            python_version="3.11.9", seed=0, config_yaml="", timestamp="2026-01-01T00:00:00+00:00",
            interpreted=bool(impl == "triton" and i % 97 == 0), input_dist="gaussian", method_params="{}",
            depth=depth, variant="single" if task == "needle" else None, beta=8.0 if task == "needle" else None,
        )  # fmt: skip
        row.update(declarations(task, row))
        yield row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--compact", action="store_true", help="write one compacted file, not a file per row")
    args = parser.parse_args(argv)
    if args.compact:
        path = write_compacted(args.out, rows(args.rows))
        print(f"{args.rows} rows written to {path}")
        return 0
    written = [write_row(args.out, row) for row in rows(args.rows)]
    print(f"{len(written)} rows written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
