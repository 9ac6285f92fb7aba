"""Efficiency length (CAB's metric): the context length beyond which a method is cheaper than exact softmax.

Each curve (one method/impl at one pattern, mode, dtype and shape) gets a
power-law fit cost = a * N^k by least squares in log-log space; the baseline
(softmax/sdpa by default: what a user would run instead) gets its own fit at
the same pattern, mode, dtype and shape. The efficiency length is where the
two fits cross, N* = (a / a0)^(1 / (k0 - k)). Fits rather than measured
points, because measured curves cross several times in noise at short
lengths, and a fit extrapolates (flagged as such) beyond the longest length
measured. Done for latency and for peak memory.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from bench.slopes import GROUP_KEYS

BASELINE = ("softmax", "sdpa")
METRICS = {"latency_ms": "time", "peak_mem_bytes": "memory"}
SHAPE = ("pattern", "mode", "dtype", "batch", "heads", "head_dim", "input_dist")
EFFICIENCY_PNG = "efficiency_length.png"
PLOT_MAX = 2.0**30  # bars stop here: a crossover at a billion tokens is as good as never


def fit_power_law(lengths: np.ndarray, costs: np.ndarray) -> tuple[float, float]:
    """(a, k) of cost = a * N^k, least squares on logs; needs two distinct positive lengths."""
    x, y = np.log(np.asarray(lengths, float)), np.log(np.asarray(costs, float))
    if np.unique(x).size < 2:
        raise ValueError("a power-law fit needs at least two distinct lengths")
    k, log_a = np.polyfit(x, y, 1)
    return float(np.exp(log_a)), float(k)


def crossover(a: float, k: float, a0: float, k0: float) -> tuple[float, str]:
    """(N*, meaning): where a N^k meets a0 N^k0, and on which side the method is the cheaper one.

    meaning is 'cheaper beyond' (the method grows slower), 'cheaper below'
    (it grows faster), 'always cheaper' / 'never cheaper' (parallel fits).
    """
    if abs(k0 - k) < 1e-9:
        return (float("nan"), "always cheaper" if a < a0 else "never cheaper")
    n = float(np.exp((np.log(a) - np.log(a0)) / (k0 - k)))
    return n, "cheaper beyond" if k < k0 else "cheaper below"


def _curves(df: pd.DataFrame, metric: str, min_len: int) -> pd.DataFrame:
    """One row per curve with its fit (a, k) and measured length range, from ok compiled scaling rows."""
    rows = df
    if "task" in rows.columns:
        rows = rows[rows["task"] == "scaling"]
    rows = rows[rows["status"].eq("ok") & rows[metric].notna() & (pd.to_numeric(rows[metric], errors="coerce") > 0)]
    if "interpreted" in rows.columns:
        rows = rows[~rows["interpreted"].fillna(False).astype(bool)]
    rows = rows[rows["kv_len"].notna() & (rows["kv_len"] >= max(min_len, 1))]
    if rows.empty:
        return pd.DataFrame()
    cross = rows["mode"].ne("decode") & rows["seq_len"].ne(rows["kv_len"])
    pattern = rows["causal"].map(lambda c: "causal" if bool(c) else "non-causal")
    rows = rows.assign(pattern=pattern.where(~cross, pattern + "-cross"))  # as bench.slopes names it
    keys = [k for k in GROUP_KEYS if k in rows.columns]
    rows[keys] = rows[keys].astype(object).where(rows[keys].notna(), "")
    # Vectorised least squares over every curve at once: a groupby per curve takes minutes at 10k rows.
    per_len = rows.groupby([*keys, "kv_len"], sort=True)[metric].median().reset_index()
    per_len["x"], per_len["y"] = np.log(per_len["kv_len"].astype(float)), np.log(per_len[metric].astype(float))
    per_len["xx"], per_len["xy"] = per_len["x"] ** 2, per_len["x"] * per_len["y"]
    g = per_len.groupby(keys, sort=True).agg(
        n=("x", "size"), sx=("x", "sum"), sy=("y", "sum"), sxx=("xx", "sum"), sxy=("xy", "sum"),
        min_kv_len=("kv_len", "min"), max_kv_len=("kv_len", "max"),
    )  # fmt: skip
    g = g[g["n"] >= 2]
    denom = g["n"] * g["sxx"] - g["sx"] ** 2
    g = g[denom > 0]
    k = (g["n"] * g["sxy"] - g["sx"] * g["sy"]) / denom[denom > 0]
    out = g.assign(k=k, a=np.exp((g["sy"] - k * g["sx"]) / g["n"]))
    out = out.reset_index()[[*keys, "a", "k", "min_kv_len", "max_kv_len"]]
    out[["min_kv_len", "max_kv_len"]] = out[["min_kv_len", "max_kv_len"]].astype(int)
    return out


def efficiency_lengths(
    df: pd.DataFrame, baseline: tuple[str, str] = BASELINE, min_len: int = 0
) -> pd.DataFrame:
    """One row per (curve, metric): the fits, N* and its meaning, and whether N* lies beyond the measured range."""
    out: list[pd.DataFrame] = []
    for metric, name in METRICS.items():
        if metric not in df.columns:
            continue
        curves = _curves(df, metric, min_len)
        if curves.empty:
            continue
        shape = [k for k in SHAPE if k in curves.columns]
        base = curves[(curves["method"] == baseline[0]) & (curves["impl"] == baseline[1])]
        if "method_params" in base.columns:
            base = base.drop_duplicates(shape)
        base = base[[*shape, "a", "k", "min_kv_len", "max_kv_len"]].rename(
            columns={"a": "a0", "k": "k0", "min_kv_len": "b_min", "max_kv_len": "b_max"}
        )
        is_base = (curves["method"] == baseline[0]) & (curves["impl"] == baseline[1])
        m = curves[~is_base].merge(base, on=shape, how="inner")
        if m.empty:
            continue
        with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
            n = np.exp((np.log(m["a"]) - np.log(m["a0"])) / (m["k0"] - m["k"]))
        parallel = (m["k0"] - m["k"]).abs() < 1e-9
        meaning = np.where(m["k"] < m["k0"], "cheaper beyond", "cheaper below")
        meaning = np.where(parallel, np.where(m["a"] < m["a0"], "always cheaper", "never cheaper"), meaning)
        n = n.where(~parallel, np.nan)
        lo, hi = np.maximum(m["min_kv_len"], m["b_min"]), np.minimum(m["max_kv_len"], m["b_max"])
        m = m.assign(metric=name, slope=m["k"], baseline_slope=m["k0"], efficiency_length=n, meaning=meaning,
                     extrapolated=np.isfinite(n) & ~((lo <= n) & (n <= hi)))  # fmt: skip
        out.append(m.drop(columns=["a", "k", "a0", "k0", "b_min", "b_max"]))
    return pd.concat(out, ignore_index=True) if out else pd.DataFrame()
    return pd.DataFrame(out)


def fmt_length(n: float, meaning: str) -> str:
    if not np.isfinite(n):
        return meaning
    return f"{meaning} {n:,.0f}" if n >= 1 else f"{meaning} 1"


def efficiency_table(eff: pd.DataFrame, baseline: tuple[str, str] = BASELINE) -> str:
    """Markdown: one row per curve, efficiency length for time and for memory side by side."""
    if eff.empty:
        return ""
    cols = [c for c in ("method", "impl", "pattern", "mode", "dtype", "batch", "heads", "head_dim", "method_params")
            if c in eff.columns]  # fmt: skip
    if "method_params" in cols and not (eff.groupby("method")["method_params"].nunique() > 1).any():
        cols.remove("method_params")  # parameters only distinguish rows where one method ran with several sets
    lines = [
        "## Efficiency length\n",
        f"Context length where a power-law fit of the method's cost crosses the fit of {'/'.join(baseline)} at the "
        "same pattern, mode, dtype and shape (CAB's efficiency length); * = outside the measured lengths "
        "(an extrapolation).\n",
        "| " + " | ".join([*cols, "time", "memory", "slope (time)"]) + " |",
        "|" + "|".join(["---"] * (len(cols) + 3)) + "|",
    ]
    eff = eff.copy()
    eff[cols] = eff[cols].astype(str)
    # One pivot rather than a loop over curves: thousands of curves at 10k rows.
    text = pd.Series(
        [fmt_length(n, m) for n, m in zip(eff["efficiency_length"], eff["meaning"], strict=True)], index=eff.index
    )
    eff["_text"] = text + np.where(eff["extrapolated"], "*", "")
    eff["_slope"] = eff["slope"].map(lambda x: f"{x:.2f}")
    wide = eff.pivot_table(index=cols, columns="metric", values="_text", aggfunc="first")
    slope = eff[eff["metric"] == "time"].drop_duplicates(cols).set_index(cols)["_slope"]
    wide = wide.reindex(columns=["time", "memory"]).join(slope.rename("slope")).fillna("–").reset_index()
    for row in wide[[*cols, "time", "memory", "slope"]].itertuples(index=False):
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |")
    return "\n".join(lines) + "\n"


def efficiency_plot(eff: pd.DataFrame, path: Path, baseline: tuple[str, str] = BASELINE) -> Path | None:
    """Horizontal bars of N* (log scale) per method for time and memory, for the most common pattern/mode/dtype."""
    if eff.empty:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    shape = [c for c in ("pattern", "mode", "dtype", "batch", "heads", "head_dim") if c in eff.columns]
    sizes = eff.groupby(shape).size().rename("n").reset_index()
    sizes["fwd"] = sizes["mode"].eq("fwd") if "mode" in sizes else False  # ties: the forward pass, as CAB reports
    top = tuple(sizes.sort_values(["n", "fwd"], ascending=False, kind="stable").iloc[0][shape])
    sel = eff[(eff[shape].astype(str) == pd.Series(top, index=shape).astype(str)).all(axis=1)]
    labels = sorted((sel["method"].astype(str) + "/" + sel["impl"].astype(str)).unique())
    fig = Figure(figsize=(7.0, 0.6 + 0.22 * len(labels) + 0.6), dpi=150)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, sharey=True)
    for ax, name in zip(axes, ("time", "memory"), strict=True):
        m = sel[sel["metric"] == name].assign(_l=lambda d: d["method"].astype(str) + "/" + d["impl"].astype(str))
        for i, lab in enumerate(labels):
            r = m[m["_l"] == lab]
            if r.empty or not np.isfinite(r.iloc[0]["efficiency_length"]) or r.iloc[0]["efficiency_length"] < 2:
                note = "–" if r.empty else r.iloc[0]["meaning"] + (" 1" if np.isfinite(r.iloc[0]["efficiency_length"])
                                                                  else "")  # fmt: skip
                ax.text(1.2, i, note, va="center", fontsize=6, color="grey")
                continue
            r = r.iloc[0]
            color = "C2" if r["meaning"] == "cheaper beyond" else "C3"
            ax.barh(i, min(r["efficiency_length"], PLOT_MAX), color=color, alpha=0.5 if r["extrapolated"] else 1.0, left=1)
        ax.set_xscale("log", base=2)
        ax.set_xlim(1, PLOT_MAX)
        ax.set_title(f"{name}: N* vs {'/'.join(baseline)}", fontsize=8)
        ax.tick_params(labelsize=6)
        ax.grid(True, axis="x", alpha=0.3)
        ax.set_xlabel("efficiency length (tokens)", fontsize=7)
    axes[0].set_yticks(range(len(labels)), labels)
    fig.suptitle("Efficiency length (green: cheaper beyond N*; red: cheaper below; faded: extrapolated)\n"
                 + " · ".join(str(t) for t in top), fontsize=8)  # fmt: skip
    fig.subplots_adjust(left=0.25, right=0.97, top=1 - 0.6 / fig.get_figheight(), bottom=0.45 / fig.get_figheight())
    fig.savefig(path)
    return path
