"""MQAR views: the best learning rate per (method, size), and recall against state size (Based Figure 2).

Zoology sweeps the learning rate and reports the best run per model size;
each lr is its own row here, so the report does the selection and shows the
spread over lrs (a method that only works at one lr is fragile, and the
spread says so). `bench.report` calls `mqar_table` and `mqar_plots`.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

GROUP = ["method", "impl", "d_model", "seq_len", "num_kv_pairs"]


def _mqar_rows(df: pd.DataFrame) -> pd.DataFrame:
    if df.empty or "task" not in df.columns:
        return df.iloc[0:0]
    rows = df[(df["task"] == "mqar") & (df["status"] == "ok")]
    return rows[rows["accuracy"].notna()] if not rows.empty else rows


def best_per_size(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (method, impl, d_model, seq_len, num_kv_pairs): the best-accuracy lr, plus min/max over lrs."""
    rows = _mqar_rows(df)
    if rows.empty:
        return pd.DataFrame(columns=[*GROUP, "accuracy", "lr", "acc_min", "acc_max", "n_lrs", "state_bytes",
                                     "train_seconds"])
    best = rows.loc[rows.groupby(GROUP, dropna=False)["accuracy"].idxmax()].set_index(GROUP)
    spread = rows.groupby(GROUP, dropna=False)["accuracy"].agg(acc_min="min", acc_max="max", n_lrs="count")
    out = best[["accuracy", "lr", "state_bytes", "train_seconds"]].join(spread).reset_index()
    return out.sort_values(["seq_len", "d_model", "accuracy"], ascending=[True, True, False]).reset_index(drop=True)


def _bytes(n) -> str:
    if n is None or pd.isna(n):
        return "-"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def mqar_table(df: pd.DataFrame) -> str:
    """Markdown: method, impl, d_model, seq_len, kv pairs, best accuracy, lr of best, spread, state bytes, train s."""
    best = best_per_size(df)
    if best.empty:
        return ""
    lines = [
        "| method | impl | d_model | seq_len | kv pairs | best accuracy | lr of best | spread (min-max, n lrs) "
        "| state | train s |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |",
    ]
    for r in best.itertuples(index=False):
        lines.append(
            f"| {r.method} | {r.impl} | {int(r.d_model)} | {int(r.seq_len)} | {int(r.num_kv_pairs)} | {r.accuracy:.3f} "
            f"| {r.lr:.2g} | {r.acc_min:.3f}-{r.acc_max:.3f} ({int(r.n_lrs)}) | {_bytes(r.state_bytes)} "
            f"| {r.train_seconds:.1f} |"
        )
    return "\n".join(lines) + "\n"


def mqar_plots(df: pd.DataFrame, out_dir: Path | str) -> list[Path]:
    """Accuracy against state bytes (log x), one point per method at its best lr, one figure per (seq_len, kv).

    Methods with no state (the identity baseline) cannot sit on a log axis; they are drawn as a
    horizontal line, which is what they are: the floor.
    """
    best = best_per_size(df)
    if best.empty:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for (seq_len, kv), group in best.groupby(["seq_len", "num_kv_pairs"]):
        fig, ax = plt.subplots(figsize=(6, 4))
        for label, g in group.groupby(["method", "impl"]):
            name = label[0] if label[1] == "reference" else f"{label[0]}/{label[1]}"
            stateful = g[g["state_bytes"].fillna(0) > 0]
            if not stateful.empty:
                ax.plot(stateful["state_bytes"], stateful["accuracy"], "o-", label=name)
            for acc in g.loc[g["state_bytes"].fillna(0) <= 0, "accuracy"].unique():
                ax.axhline(acc, linestyle=":", color="grey", label=f"{name} (no state)")
        ax.set_xscale("log")
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("state bytes at seq_len (per sequence, all layers)")
        ax.set_ylabel("MQAR accuracy (best lr)")
        ax.set_title(f"MQAR recall vs state, seq_len={int(seq_len)}, kv pairs={int(kv)}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"mqar_recall_vs_state_n{int(seq_len)}_kv{int(kv)}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths
