"""Efficiency length (CAB's metric): the context length beyond which a method is cheaper than exact softmax.

Each curve (one method/impl at one pattern and one value of every other key;
see `slopes.curve_rows`) gets a power-law fit cost = a * N^k by least squares
in log-log space; the baseline (softmax/sdpa by default: what a user would run
instead) gets its own fit at the same pattern and keys (method parameters
aside). The efficiency length is where the two fits cross,
N* = (a / a0)^(1 / (k0 - k)). Fits rather than measured points, because
measured curves cross several times in noise at short lengths, and a fit
extrapolates (flagged as such) beyond the longest length measured. Done for
latency and for peak memory. A time crossing whose curve or baseline curve has a
row the interference probe found disturbed is marked † (hatched in the figure).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from bench.disturbed import LABEL, MARK
from bench.report.document import Part, Table
from bench.report.format import DISTURBED_NOTE, MISSING, PARAMS
from bench.report.slopes import curve_cells, fit_curves

BASELINE = ("softmax", "sdpa")
METRICS = {"latency_ms": "time", "peak_mem_bytes": "memory"}
EFFICIENCY_PNG = "efficiency_length.png"
PLOT_MAX = 2.0**30  # bars stop here: a crossover at a billion tokens is as good as never
RESULTS = ("metric", "slope", "baseline_slope", "efficiency_length", "meaning", "extrapolated", "min_kv_len",
           "max_kv_len", "disturbed")  # fmt: skip
NOT_SHAPE = ("method", "impl", PARAMS)  # a curve's columns that the baseline's need not share


def crossover(a: float, k: float, a0: float, k0: float) -> tuple[float, str]:
    """(N*, meaning): where a N^k meets a0 N^k0, and on which side the method is the cheaper one.

    meaning is 'cheaper beyond' (the method grows slower), 'cheaper below'
    (it grows faster), 'always cheaper' / 'never cheaper' (parallel fits).
    """
    if abs(k0 - k) < 1e-9:
        return (float("nan"), "always cheaper" if a < a0 else "never cheaper")
    n = float(np.exp((np.log(a) - np.log(a0)) / (k0 - k)))
    return n, "cheaper beyond" if k < k0 else "cheaper below"


def efficiency_lengths(df: pd.DataFrame, baseline: tuple[str, str] = BASELINE, min_len: int = 0) -> pd.DataFrame:
    """One row per (curve, metric): the fits, N* and its meaning, and whether N* lies beyond the measured range."""
    out: list[pd.DataFrame] = []
    for metric, name in METRICS.items():
        curves, keys = fit_curves(df, metric, min_len)
        curves = curves[curves["k"].notna()] if not curves.empty else curves
        if curves.empty:
            continue
        shape = [k for k in keys if k not in NOT_SHAPE]
        is_base = (curves["method"] == baseline[0]) & (curves["impl"] == baseline[1])
        base = (
            curves[is_base]
            .drop_duplicates(shape)[[*shape, "a", "k", "min_kv_len", "max_kv_len", "disturbed"]]
            .rename(columns={"a": "a0", "k": "k0", "min_kv_len": "b_min", "max_kv_len": "b_max",
                             "disturbed": "b_disturbed"})  # fmt: skip
        )
        m = curves[~is_base].drop(columns="n_lengths").merge(base, on=shape, how="inner")
        if m.empty:
            continue
        with np.errstate(divide="ignore", over="ignore", invalid="ignore"):  # a far crossing is inf, not an error
            found = [crossover(*fits) for fits in zip(m["a"], m["k"], m["a0"], m["k0"], strict=True)]
        n = pd.Series([f[0] for f in found], index=m.index, dtype=float)
        meaning = [f[1] for f in found]
        lo, hi = np.maximum(m["min_kv_len"], m["b_min"]), np.minimum(m["max_kv_len"], m["b_max"])
        m = m.assign(metric=name, slope=m["k"], baseline_slope=m["k0"], efficiency_length=n, meaning=meaning,
                     extrapolated=np.isfinite(n) & ~((lo <= n) & (n <= hi)),
                     disturbed=m["disturbed"].astype(bool) | m["b_disturbed"].astype(bool))  # fmt: skip
        out.append(m.drop(columns=["a", "k", "a0", "k0", "b_min", "b_max", "b_disturbed"]))
    return pd.concat(out, ignore_index=True) if out else pd.DataFrame()


def fmt_length(n: float, meaning: str) -> str:
    if not np.isfinite(n):
        return meaning
    return f"{meaning} {n:,.0f}" if n >= 1 else f"{meaning} 1"


def efficiency_part(eff: pd.DataFrame, baseline: tuple[str, str] = BASELINE) -> Part | None:
    """One row per curve, efficiency length for time and for memory side by side; None without any."""
    if eff.empty:
        return None
    curve = [c for c in eff.columns if c not in RESULTS]
    eff = eff.copy()
    # One pivot rather than a loop over curves: thousands of curves at 10k rows.
    text = pd.Series(
        [fmt_length(n, m) for n, m in zip(eff["efficiency_length"], eff["meaning"], strict=True)], index=eff.index
    )
    eff["_text"] = text + np.where(eff["extrapolated"], "*", "") + np.where(eff["disturbed"], MARK, "")
    eff["_slope"] = eff["slope"].map(lambda x: f"{x:.2f}") + np.where(eff["disturbed"], MARK, "")
    wide = eff.pivot_table(index=curve, columns="metric", values="_text", aggfunc="first")
    slope = eff[eff["metric"] == "time"].drop_duplicates(curve).set_index(curve)["_slope"]
    wide = wide.reindex(columns=["time", "memory"]).join(slope.rename("slope (time)")).fillna(MISSING).reset_index()
    cells, caption = curve_cells(wide[curve])
    for col in ("time", "memory", "slope (time)"):
        cells[col] = wide[col]
    text = (f"Context length where a power-law fit of the method's cost crosses the fit of {'/'.join(baseline)} at the "
            "same pattern, mode, dtype and shape (CAB's efficiency length); * = outside the measured lengths "
            "(an extrapolation).")  # fmt: skip
    note = DISTURBED_NOTE + f" Here {MARK} marks a crossing fitted through such a row." if eff["disturbed"].any() else ""
    return Part("Efficiency length", text=[text], tables=[Table(cells, caption=caption, note=note)])


def efficiency_plot(eff: pd.DataFrame, path: Path, baseline: tuple[str, str] = BASELINE) -> Path | None:
    """Horizontal bars of N* (log scale) per method for time and memory, for the most common curve shape."""
    if eff.empty:
        return None
    shape = [c for c in eff.columns if c not in (*RESULTS, *NOT_SHAPE)]
    sizes = eff.groupby(shape).size().rename("n").reset_index()
    sizes["fwd"] = sizes["mode"].eq("fwd") if "mode" in sizes else False  # ties: the forward pass, as CAB reports
    top = tuple(sizes.sort_values(["n", "fwd"], ascending=False, kind="stable").iloc[0][shape])
    sel = eff[(eff[shape].astype(str) == pd.Series(top, index=shape).astype(str)).all(axis=1)]
    labels = sorted((sel["method"].astype(str) + "/" + sel["impl"].astype(str)).unique())
    disturbed = bool(sel["disturbed"].any())
    legend_in = 0.25 if disturbed else 0.0  # room below the axes for the hatch's legend entry
    fig = Figure(figsize=(7.0, 0.6 + 0.22 * len(labels) + 0.6 + legend_in), dpi=150)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, sharey=True)
    for ax, name in zip(axes, ("time", "memory"), strict=True):
        m = sel[sel["metric"] == name].assign(_l=lambda d: d["method"].astype(str) + "/" + d["impl"].astype(str))
        for i, lab in enumerate(labels):
            r = m[m["_l"] == lab]
            if r.empty or not np.isfinite(r.iloc[0]["efficiency_length"]) or r.iloc[0]["efficiency_length"] < 2:
                note = MISSING if r.empty else r.iloc[0]["meaning"] + (
                    " 1" if np.isfinite(r.iloc[0]["efficiency_length"]) else "")  # fmt: skip
                ax.text(1.2, i, note, va="center", fontsize=6, color="grey")
                continue
            r = r.iloc[0]
            color = "C2" if r["meaning"] == "cheaper beyond" else "C3"
            ax.barh(i, min(r["efficiency_length"], PLOT_MAX), color=color, alpha=0.5 if r["extrapolated"] else 1.0,
                    left=1, hatch="////" if r["disturbed"] else None, edgecolor="black" if r["disturbed"] else None,
                    gid="disturbed" if r["disturbed"] else None)  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_xlim(1, PLOT_MAX)
        ax.set_title(f"{name}: N* vs {'/'.join(baseline)}", fontsize=8)
        ax.tick_params(labelsize=6)
        ax.grid(True, axis="x", alpha=0.3)
        ax.set_xlabel("efficiency length (tokens)", fontsize=7)
    axes[0].set_yticks(range(len(labels)), labels)
    fig.suptitle("Efficiency length (green: cheaper beyond N*; red: cheaper below; faded: extrapolated)\n"
                 + " · ".join(str(t) for t in top if str(t)), fontsize=8)  # fmt: skip
    if disturbed:
        fig.legend(handles=[Patch(facecolor="white", edgecolor="black", hatch="////", label=f"{LABEL}: fitted "
                                  "through a disturbed row")], loc="lower center", fontsize=6, frameon=False)  # fmt: skip
    height = fig.get_figheight()
    fig.subplots_adjust(left=0.25, right=0.97, top=1 - 0.6 / height, bottom=(0.45 + legend_in) / height)
    fig.savefig(path)
    return path
