"""Views of the `mqar` task's rows: the best learning rate per (method, size), and recall against state size.

Zoology sweeps the learning rate and reports the best run per model size;
each lr is its own row here, so the views do the selection and show the
spread over lrs (a method that only works at one lr is fragile, and the
spread says so). Based's Figure 2 plots recall against the recurrent state a
decoder keeps; `recall_vs_state_plots` draws it from the rows' `state_bytes`.

Every function takes the task's rows only (any status; the report has already
filtered on the task), and reads nothing but the row columns.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

GROUP = ["method", "impl", "d_model", "seq_len", "num_kv_pairs"]
BEST_COLUMNS = [*GROUP, "accuracy", "lr", "acc_min", "acc_max", "n_lrs", "state_bytes", "train_seconds"]
TABLE_HEADER = ["method", "impl", "d_model", "seq_len", "kv pairs", "best accuracy ↑", "lr of best",
                "spread over lrs (min-max, n)", "state", "train s"]


def ok_rows(rows: pd.DataFrame) -> pd.DataFrame:
    """The rows with a measured accuracy (status ok) and every column the views group by."""
    needed = {*GROUP, "status", "accuracy", "lr"}
    if rows is None or rows.empty or not needed <= set(rows.columns):
        return pd.DataFrame(columns=sorted(needed))
    ok = rows[rows["status"].eq("ok")]
    return ok[pd.to_numeric(ok["accuracy"], errors="coerce").notna()]


def best_per_size(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per (method, impl, d_model, seq_len, num_kv_pairs): the best-accuracy lr, plus min/max over lrs."""
    ok = ok_rows(rows)
    if ok.empty:
        return pd.DataFrame(columns=BEST_COLUMNS)
    ok = ok.assign(accuracy=pd.to_numeric(ok["accuracy"]))
    for col in ("state_bytes", "train_seconds"):
        if col not in ok.columns:
            ok = ok.assign(**{col: None})
    best = ok.loc[ok.groupby(GROUP, dropna=False)["accuracy"].idxmax()].set_index(GROUP)
    spread = ok.groupby(GROUP, dropna=False)["accuracy"].agg(acc_min="min", acc_max="max", n_lrs="count")
    out = best[["accuracy", "lr", "state_bytes", "train_seconds"]].join(spread).reset_index()
    out = out.sort_values(["seq_len", "d_model", "accuracy"], ascending=[True, True, False])
    return out[BEST_COLUMNS].reset_index(drop=True)


def format_bytes(n: float | None) -> str:
    """1536 -> '1.5 KiB'; '-' for a missing value."""
    if n is None or pd.isna(n):
        return "-"
    n = float(n)
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _number(value: float | None, fmt: str) -> str:
    return "-" if value is None or pd.isna(value) else format(float(value), fmt)


def mqar_table(rows: pd.DataFrame) -> pd.DataFrame:
    """The best lr per size as text cells (TABLE_HEADER), smallest size first, best method first within it."""
    best = best_per_size(rows)
    cells = [
        [
            str(r.method), str(r.impl), str(int(r.d_model)), str(int(r.seq_len)), str(int(r.num_kv_pairs)),
            f"{r.accuracy:.3f}", _number(r.lr, ".2g"), f"{r.acc_min:.3f}-{r.acc_max:.3f} ({int(r.n_lrs)})",
            format_bytes(r.state_bytes), _number(r.train_seconds, ".1f"),
        ]
        for r in best.itertuples(index=False)
    ]
    return pd.DataFrame(cells, columns=TABLE_HEADER)


def recall_vs_state_plots(rows: pd.DataFrame, out_dir: Path | str) -> list[Path]:
    """Accuracy against state bytes (log x), one point per method and size at its best lr, one figure per
    (seq_len, kv pairs).

    Methods with no state (the identity baseline) cannot sit on a log axis; they are drawn as a
    horizontal line, which is what they are: the floor.
    """
    best = best_per_size(rows)
    if best.empty:
        return []
    # Imported here: matplotlib costs a noticeable start-up time, and only a report draws.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for (seq_len, kv), group in best.groupby(["seq_len", "num_kv_pairs"]):
        fig = Figure(figsize=(6, 4))
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        for (method, impl), g in group.groupby(["method", "impl"]):
            name = method if impl == "reference" else f"{method}/{impl}"
            state = pd.to_numeric(g["state_bytes"], errors="coerce").fillna(0)
            stateful = g[state > 0].sort_values("state_bytes")
            if not stateful.empty:
                ax.plot(stateful["state_bytes"], stateful["accuracy"], "o-", label=name)
            for acc in g.loc[state <= 0, "accuracy"].unique():
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
        paths.append(path)
    return paths
