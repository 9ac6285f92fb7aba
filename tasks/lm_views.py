"""Views of the perplexity tasks' rows (`lm` and `lm_swap`): a perplexity table and loss / context plots.

`lm` trains a small GPT per attention method, so its rows answer "how good a
language model does this method train"; `lm_swap` swaps a training-free method
into a trained softmax model, so its rows answer "how much perplexity does the
approximation cost at each context length". Both land in one table, split by
protocol, because a reader compares them side by side; the Δ column puts each
number against exact softmax on the same setting, which is the comparison that
matters (an absolute perplexity on a toy corpus means little on its own).

Every function takes rows of any task and status, keeps the ok rows of its own
task, and reads nothing but the row columns (a missing column reads as empty,
so old or partial results still render).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd

TABLE_COLUMNS = ["method", "impl", "protocol", "setting", "context", "val loss (nats) ↓", "perplexity ↓",
                 "bits/char ↓", "Δ perplexity vs softmax ↓", "seeds"]
MISSING = "–"
TRAIN = "train"
REFERENCE_LABEL = "exact softmax (reference)"

_TEXT = ["method", "impl", "preset", "base_preset", "source", "tokenizer", "swap"]
_NUMBERS = ["context", "eval_context", "val_loss", "perplexity", "bits_per_char", "ppl_increase",
            "softmax_perplexity"]


def _ok_rows(rows: pd.DataFrame | None, task: str) -> pd.DataFrame:
    """The ok rows of `task` that carry a loss or perplexity, with every column the views read.

    Text keys are filled with "" (a NaN key would drop out of a groupby); a row with only one of
    val_loss / perplexity gets the other from perplexity = exp(val_loss).
    """
    if rows is None or rows.empty or not {"task", "status"} <= set(rows.columns):
        return pd.DataFrame(columns=[*_TEXT, *_NUMBERS, "seed", "curve"])
    ok = rows[rows["task"].eq(task) & rows["status"].eq("ok")].copy()
    for col in [*_TEXT, *_NUMBERS, "seed", "curve"]:
        if col not in ok.columns:
            ok[col] = None
    for col in _TEXT:
        ok[col] = ok[col].map(lambda v: "" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v))
    for col in _NUMBERS:
        ok[col] = pd.to_numeric(ok[col], errors="coerce").astype(float)
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        ok["perplexity"] = ok["perplexity"].fillna(np.exp(ok["val_loss"]))
        ok["val_loss"] = ok["val_loss"].fillna(np.log(ok["perplexity"]))
    return ok[ok["perplexity"].notna()]


def swap_protocol(swap: str) -> str:
    """'all' -> 'swap: all layers', 'last 2' -> 'swap: last 2 layers', 'last 1' -> 'swap: last 1 layer'; else as given."""
    text = str(swap).strip()
    if text == "all":
        return "swap: all layers"
    if re.fullmatch(r"last \d+", text):
        return f"swap: {text} layer{'' if text == 'last 1' else 's'}"
    return f"swap: {text}"


def _protocol_order(protocol: str) -> tuple[int, int, str]:
    """Train first, then swapping all layers, then the last N layers by N."""
    if protocol == TRAIN:
        return (0, 0, "")
    if protocol == "swap: all layers":
        return (1, 0, "")
    match = re.fullmatch(r"swap: last (\d+) layers", protocol)
    return (2, int(match.group(1)), "") if match else (3, 0, protocol)


def _setting(preset: str, source: str, tokenizer: str) -> str:
    return f"{preset} · {source}/{tokenizer}"


def _long_rows(rows: pd.DataFrame) -> pd.DataFrame:
    """Both tasks' ok rows in one shape: setting, protocol, context, the metrics, and Δ (lm_swap only, so far)."""
    lm = _ok_rows(rows, "lm")
    swap = _ok_rows(rows, "lm_swap")
    keep = ["method", "impl", "setting", "protocol", "context", "val_loss", "perplexity", "bits_per_char", "delta"]
    lm = lm.assign(
        setting=[_setting(*k) for k in zip(lm["preset"], lm["source"], lm["tokenizer"], strict=True)],
        protocol=TRAIN,
        delta=float("nan"),
    )
    swap = swap.assign(
        setting=[_setting(*k) for k in zip(swap["base_preset"], swap["source"], swap["tokenizer"], strict=True)],
        protocol=swap["swap"].map(swap_protocol),
        context=swap["eval_context"],
        delta=swap["ppl_increase"],
    )
    parts = [part[keep] for part in (lm, swap) if not part.empty]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=keep)


def _number(value: float, fmt: str) -> str:
    return MISSING if value is None or pd.isna(value) else format(float(value), fmt)


def perplexity_table(rows: pd.DataFrame) -> pd.DataFrame:
    """One text line per (setting, protocol, context, method, impl), metrics averaged over seeds (ok rows only).

    For trained (`lm`) lines, Δ is the line's perplexity minus exact softmax's on the same setting and
    context (the mean over softmax impls, each averaged over its seeds), "–" when softmax was not trained
    there; for swap lines it is the mean of the rows' own `ppl_increase` (same model, same tokens).
    """
    long = _long_rows(rows)
    long = long[long["context"].notna()]
    if long.empty:
        return pd.DataFrame(columns=TABLE_COLUMNS)
    keys = ["setting", "protocol", "context", "method", "impl"]
    lines = long.groupby(keys, sort=False).agg(
        val_loss=("val_loss", "mean"), perplexity=("perplexity", "mean"), bits_per_char=("bits_per_char", "mean"),
        delta=("delta", "mean"), seeds=("perplexity", "size"),
    ).reset_index()
    trained = lines["protocol"].eq(TRAIN)
    softmax = lines[trained & lines["method"].eq("softmax")]
    reference = softmax.groupby(["setting", "context"])["perplexity"].mean()
    ref = [reference.get((s, c), float("nan")) for s, c in zip(lines["setting"], lines["context"], strict=True)]
    lines.loc[trained, "delta"] = (lines["perplexity"] - pd.Series(ref, index=lines.index))[trained]
    lines["order"] = lines["protocol"].map(_protocol_order)
    lines = lines.sort_values(["setting", "order", "context", "perplexity"], kind="stable")
    cells = [
        [
            r.method, r.impl, r.protocol, r.setting, str(int(r.context)), _number(r.val_loss, ".3f"),
            _number(r.perplexity, ".2f"), _number(r.bits_per_char, ".3f"), _number(r.delta, "+.2f"), str(r.seeds),
        ]
        for r in lines.itertuples(index=False)
    ]
    return pd.DataFrame(cells, columns=TABLE_COLUMNS)


def parse_curve(value: object) -> list[dict]:
    """A row's `curve` as a list of points with a numeric step and val_loss; [] for anything unreadable.

    Accepts the JSON string the task writes or an already-decoded list (a results file may round-trip it);
    a corrupt row must cost its own line in a plot, never the whole report.
    """
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return []
    if not isinstance(value, list):
        return []
    points = []
    for point in value:
        if not isinstance(point, dict):
            continue
        try:
            step, loss = float(point["step"]), float(point["val_loss"])
        except (KeyError, TypeError, ValueError):
            continue
        seconds = point.get("seconds")
        try:
            seconds = float(seconds) if seconds is not None else float("nan")
        except (TypeError, ValueError):
            seconds = float("nan")
        if math.isfinite(step) and math.isfinite(loss):
            points.append({"step": step, "seconds": seconds, "val_loss": loss})
    return points


def _label(method: str, impl: str) -> str:
    return method if impl == "reference" else f"{method}/{impl}"


def _file_part(text: str) -> str:
    """A file-name-safe form of a setting value ('last 1' -> 'last_1')."""
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", str(text)).strip("_") or "none"


def _new_figure(ncols: int, width: float):
    # Imported here: matplotlib costs a noticeable start-up time, and only a report draws.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, 4))
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, ncols, squeeze=False)[0]


def loss_curve_plots(rows: pd.DataFrame, out_dir: Path | str) -> list[Path]:
    """Validation loss against step and against training wall time, one figure per (preset, source, tokenizer).

    Both axes matter: a cheap method can lose per step and still win per second, which is the trade the
    benchmark exists to show. Seeds of one method share a colour and a legend entry, drawn thin, so the
    seed spread reads as a band rather than as extra methods.
    """
    ok = _ok_rows(rows, "lm")
    points = [parse_curve(value) for value in ok["curve"]]
    ok = ok.assign(points=points)[[bool(p) for p in points]]
    if ok.empty:
        return []
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for (preset, source, tokenizer), group in ok.groupby(["preset", "source", "tokenizer"]):
        fig, (by_step, by_time) = _new_figure(2, 11)
        for i, ((method, impl), runs) in enumerate(group.groupby(["method", "impl"])):
            colour, width = f"C{i % 10}", 1.0 if len(runs) > 1 else 1.6
            for j, points in enumerate(runs["points"]):
                curve = pd.DataFrame(points).sort_values("step")
                label = _label(method, impl) if j == 0 else None
                by_step.plot(curve["step"], curve["val_loss"], color=colour, linewidth=width, label=label)
                timed = curve[curve["seconds"].notna()]
                by_time.plot(timed["seconds"], timed["val_loss"], color=colour, linewidth=width, label=label)
        by_step.set_xlabel("training step")
        by_time.set_xlabel("training wall time (s)")
        for ax in (by_step, by_time):
            ax.set_ylabel("validation loss (nats/token)")
            ax.grid(True, alpha=0.3)
        by_step.legend(fontsize=7)
        fig.suptitle(f"LM validation loss, {_setting(preset, source, tokenizer)}")
        fig.tight_layout()
        path = out_dir / f"lm_loss_curves_{_file_part(preset)}_{_file_part(source)}_{_file_part(tokenizer)}.png"
        fig.savefig(path, dpi=120)
        paths.append(path)
    return paths


def swap_context_plots(rows: pd.DataFrame, out_dir: Path | str) -> list[Path]:
    """Perplexity against eval context, one line per swapped-in method, one figure per
    (base_preset, source, tokenizer, swap), with exact softmax as a black dashed reference.

    Approximations often hold at short context and drift as it grows; the reference line is the same
    model with exact attention on the same tokens, so the gap to it is the cost of the swap alone.
    """
    ok = _ok_rows(rows, "lm_swap")
    ok = ok[ok["eval_context"].notna()]
    if ok.empty:
        return []
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for (preset, source, tokenizer, swap), group in ok.groupby(["base_preset", "source", "tokenizer", "swap"]):
        fig, (ax,) = _new_figure(1, 6.5)
        for (method, impl), g in group.groupby(["method", "impl"]):
            line = g.groupby("eval_context")["perplexity"].mean().sort_index()
            ax.plot(line.index, line.values, "o-", label=_label(method, impl))
        reference = group.groupby("eval_context")["softmax_perplexity"].mean().dropna().sort_index()
        if not reference.empty:
            ax.plot(reference.index, reference.values, "ks--", label=REFERENCE_LABEL)
        contexts = sorted(group["eval_context"].unique())
        if len(contexts) > 2:
            ax.set_xscale("log", base=2)
            ax.minorticks_off()  # only the measured contexts get a tick
        ax.set_xticks(contexts, [str(int(c)) for c in contexts])
        ax.set_xlabel("evaluation context (tokens)")
        ax.set_ylabel("validation perplexity (mean over seeds)")
        ax.set_title(f"{swap_protocol(swap)}, {_setting(preset, source, tokenizer)}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        parts = "_".join(_file_part(p) for p in (preset, source, tokenizer, swap))
        path = out_dir / f"lm_swap_ppl_vs_context_{parts}.png"
        fig.savefig(path, dpi=120)
        paths.append(path)
    return paths
