"""One screen from a device check's results (scripts/gpu_check.sh): the numbers to read first on a GPU run.

    python scripts/gpu_summary.py RESULTS_DIR [--out FILE]

Printed, and written to FILE (default RESULTS_DIR/gpu_summary.txt):

1. softmax: TFLOP/s and % of the profile's peak of our `kernel` next to `sdpa` and `flex`, per (dtype, N, causal,
   mode), and the kernel's speed against SDPA (SDPA latency / kernel latency: the same FLOPs, so > 1 is faster);
2. every Triton kernel's speed-up over its own method's PyTorch reference (reference latency / kernel latency)
   at each point both measured: is a kernel worth having where it exists;
3. how many rows ended in each status, and the first failures with their reason.

The full report (bench.report) has everything else; this is what fits on one screen.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.results import load  # noqa: E402

PEERS = ("kernel", "sdpa", "flex")  # softmax implementations side by side, ours first
POINT = ["dtype", "seq_len", "causal", "mode"]  # what a row of the softmax table is
# What a kernel row and its reference row must share to be compared (the rest of the cell's key is the impl).
MATCH = ["method", "method_params", "dtype", "batch", "heads", "head_dim", "seq_len", "kv_len", "causal", "mode",
         "input_dist"]  # fmt: skip
MAX_FAILURES = 8


def scaling_ok(df: pd.DataFrame) -> pd.DataFrame:
    """The timed rows: `ok` rows of the scaling task with a latency."""
    ok = df[(df["task"] == "scaling") & (df["status"] == "ok") & df["latency_ms"].notna()]
    return ok.astype({"causal": bool})


def softmax_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (dtype, N, causal, mode): `<impl>_tflops`, `<impl>_pct` per peer, and `kernel_vs_sdpa`."""
    rows = scaling_ok(df)
    rows = rows[(rows["method"] == "softmax") & rows["impl"].isin(PEERS)]
    if rows.empty:
        return pd.DataFrame()
    wide = rows.pivot_table(index=POINT, columns="impl", values=["tflops", "pct_peak", "latency_ms"], aggfunc="median")
    out = pd.DataFrame(index=wide.index)
    for impl in PEERS:
        for col, name in (("tflops", "tflops"), ("pct_peak", "pct")):
            # pivot_table drops an all-NaN column: no pct_peak where the profile has no peak for the dtype
            # (a CPU without fast bf16 skips measuring it).
            has = col in wide.columns.get_level_values(0) and impl in wide[col]
            out[f"{impl}_{name}"] = wide[col][impl] if has else float("nan")
    lat = wide["latency_ms"]
    out["kernel_vs_sdpa"] = lat["sdpa"] / lat["kernel"] if {"sdpa", "kernel"} <= set(lat.columns) else float("nan")
    return out.reset_index()


def speedups(df: pd.DataFrame) -> pd.DataFrame:
    """Each kernel row next to its reference at the same point: `speedup` = reference / kernel latency."""
    rows = scaling_ok(df)
    keys = [k for k in MATCH if k in rows.columns]
    kernel = rows[rows["impl"] == "kernel"][[*keys, "latency_ms"]]
    reference = rows[rows["impl"] == "reference"][[*keys, "latency_ms"]]
    both = kernel.merge(reference, on=keys, suffixes=("_kernel", "_reference"))
    both["speedup"] = both["latency_ms_reference"] / both["latency_ms_kernel"]
    return both.sort_values(["method", "mode", "seq_len", "causal"]).reset_index(drop=True)


def status_counts(df: pd.DataFrame) -> dict[str, int]:
    return {str(s): int(n) for s, n in df["status"].value_counts().sort_index().items()}


def _n(seq_len: int) -> str:
    return f"{seq_len // 1024}k" if seq_len % 1024 == 0 else str(seq_len)


def _speed(tflops, pct) -> str:
    """`312 (32%)`; `312` where the profile has no peak (an unknown GPU); `-` where nothing was timed."""
    if pd.isna(tflops):
        return "-"
    return f"{tflops:.3g}" + ("" if pd.isna(pct) else f" ({pct:.0f}%)")


def _times(x) -> str:
    return "-" if pd.isna(x) else f"{x:.2f}x"


def render(df: pd.DataFrame) -> str:
    lines = []
    if df["interpreted"].eq(True).any():
        lines.append("NOTE: interpreted kernel rows (TRITON_INTERPRET=1): their speeds say nothing about a GPU")
    table = softmax_table(df)
    lines.append("softmax: TFLOP/s (% of peak); kernel vs sdpa = sdpa latency / kernel latency")
    if table.empty:
        lines.append("  no ok softmax rows")
    else:
        shown = pd.DataFrame({
            "dtype": table["dtype"], "N": table["seq_len"].map(_n),
            "causal": table["causal"].map({True: "causal", False: "full"}), "mode": table["mode"],
            **{impl: [_speed(t, p) for t, p in zip(table[f"{impl}_tflops"], table[f"{impl}_pct"], strict=True)]
               for impl in PEERS},
            "kernel vs sdpa": table["kernel_vs_sdpa"].map(_times),
        })  # fmt: skip
        lines.append(shown.to_string(index=False))
    ups = speedups(df)
    lines.append("")
    lines.append("kernel speed-up over its reference (reference latency / kernel latency)")
    if ups.empty:
        lines.append("  no point has both an ok kernel row and an ok reference row")
    for mode, part in ups.groupby("mode", sort=True):
        part = part.assign(point=part["seq_len"].map(_n) + part["causal"].map({True: " causal", False: " full"}))
        grid = part.pivot_table(index="method", columns="point", values="speedup", aggfunc="median")
        cols = list(part.sort_values(["seq_len", "causal"])["point"].drop_duplicates())  # by N, then full/causal
        grid = grid[cols].apply(lambda col: col.map(_times))
        lines.append(f"mode {mode}:")
        lines.append(grid.to_string())
    counts = status_counts(df)
    lines.append("")
    lines.append(f"rows: {len(df)}; " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    failed = df[~df["status"].isin(["ok", "unsupported"])]
    for _, row in failed.head(MAX_FAILURES).iterrows():
        where = f"{row['method']}/{row['impl']} N={row['seq_len']} causal={bool(row['causal'])} {row['mode']}"
        lines.append(f"  {row['status']}: {where}: {str(row['reason'])[:100]}")
    if len(failed) > MAX_FAILURES:
        lines.append(f"  ... and {len(failed) - MAX_FAILURES} more (see the report)")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="a results folder (python -m bench.run ... results_dir=...)")
    parser.add_argument("--out", type=Path, help="where to write the summary (default RESULTS/gpu_summary.txt)")
    args = parser.parse_args(argv)
    df = load(args.results)
    if df.empty:
        print(f"error: no rows under {args.results}", file=sys.stderr)
        return 2
    text = render(df)
    out = args.out or args.results / "gpu_summary.txt"
    out.write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
