"""Views of the `needle` task's rows for the report: heat maps (depth x context length) and a hit-rate table.

The heat maps follow the needle-in-a-haystack plots users know (gkamradt's
test, RULER): context length across, needle depth down (0% = first token at
the top), colour = hit rate from red (0) to green (1), every cell annotated.
A cell that has no `ok` row shows its status (oom, unsupported, ...) on grey,
so a missing result is never mistaken for a miss.
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

# One figure / table row per method, impl and variant; these keys split further only where they vary,
# so a beta sweep or a causal sweep never gets averaged into one number.
GROUP_KEYS = ("method", "impl", "variant")
SETTING_KEYS = ("causal", "beta", "dtype", "head_dim", "needles", "distractor_sim", "batch", "heads")
HEATMAP_COLOURS = ("#F0496E", "#EBB839", "#0CD79F")  # the red-yellow-green of the needle plots


def _needle_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The task's rows (every status) with each column the views read, so old or partial results still draw."""
    if df is None or df.empty:
        return pd.DataFrame()
    rows = df.copy()
    for key in (*GROUP_KEYS, *SETTING_KEYS, "depth", "seq_len", "status", "accuracy"):
        if key not in rows.columns:
            rows[key] = None
    rows["variant"] = rows["variant"].fillna("single")
    return rows


def _varying(rows: pd.DataFrame) -> list[str]:
    """Setting keys with more than one value within some method/impl/variant (only those split figures and
    table rows; `needles`, say, is 1 for `single` and 4 for `multikey`, which splits nothing)."""
    groups = rows.groupby(list(GROUP_KEYS), dropna=False)
    return [k for k in SETTING_KEYS if (groups[k].agg(lambda s: s.astype(str).nunique(dropna=False)) > 1).any()]


def format_length(n: int) -> str:
    """256, 1K, 128K: the context-length labels of the needle plots."""
    n = int(n)
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def _hit_rate(cell: pd.DataFrame) -> float | None:
    """Hit rate of a group of rows: pooled over trials where `hits`/`trials` exist, else the mean accuracy."""
    ok = cell[cell["status"] == "ok"]
    if ok.empty:
        return None
    if {"hits", "trials"} <= set(ok.columns) and ok["trials"].notna().all() and ok["trials"].sum() > 0:
        return float(ok["hits"].sum() / ok["trials"].sum())
    values = ok["accuracy"].dropna()
    return float(values.mean()) if not values.empty else None


def _status_label(cell: pd.DataFrame) -> str:
    """The most common status of rows that are not ok, for a cell with no ok row."""
    statuses = cell["status"].dropna()
    return str(statuses.mode().iloc[0]) if not statuses.empty else "n/a"


def _groups(rows: pd.DataFrame, keys: list[str]):
    for values, group in rows.groupby(keys, dropna=False, sort=True):
        yield dict(zip(keys, values, strict=True)), group


def _figure_groups(rows: pd.DataFrame):
    """One figure per method/impl/variant, split further only by the settings that vary within it."""
    for _, group in _groups(rows, list(GROUP_KEYS)):
        yield from _groups(group, [*GROUP_KEYS, *_varying(group)])


def _setting_text(key: dict) -> str:
    return " ".join(f"{k}={key[k]}" for k in key if k not in GROUP_KEYS)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", text).strip("_")


def needle_heatmaps(df: pd.DataFrame, out_dir: Path | str) -> list[Path]:
    """One PNG per method/impl/variant (and per setting that varies within it): depth down, context
    length across. A group with no ok row at all gets no figure (the table shows its status).

    The grids are filled here (one groupby per figure); each figure is drawn through `background.draw`, so
    under the report's drawer the twenty figures of a 10,000-row campaign are drawn in a child.
    """
    import numpy as np

    from bench.report import background  # here: bench.report imports the task registry, which imports this

    rows = _needle_rows(df)
    if rows.empty:
        return []
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for key, group in _figure_groups(rows):
        if not (group["status"] == "ok").any():
            continue  # nothing measured: the table says why (unsupported, oom, ...)
        lengths = sorted(int(n) for n in group["seq_len"].dropna().unique())
        depths = sorted(float(d) for d in group["depth"].dropna().unique())
        if not lengths or not depths:
            continue
        grid = np.full((len(depths), len(lengths)), np.nan)
        labels = [["" for _ in lengths] for _ in depths]
        at = group[group["depth"].notna() & group["seq_len"].notna()]
        cells = at.groupby([at["depth"].astype(float), at["seq_len"].astype(int)], sort=False)
        row_of, col_of = {d: i for i, d in enumerate(depths)}, {n: j for j, n in enumerate(lengths)}
        for (depth, n), cell in cells:
            i, j = row_of[depth], col_of[n]
            rate = _hit_rate(cell)
            if rate is None:
                labels[i][j] = _status_label(cell)
            else:
                grid[i, j] = rate
                labels[i][j] = f"{rate:.2f}"
        title = f"{key['method']}/{key['impl']}: needle ({key['variant']})"
        setting = _setting_text(key)
        name = _slug("needle_" + "_".join(str(key[k]) for k in GROUP_KEYS) + (f"_{setting}" if setting else ""))
        path = out_dir / f"{name}.png"
        background.draw(draw_heatmap, grid, labels, lengths, depths, title + (f"\n{setting}" if setting else ""), path)
        paths.append(path)
    return paths


def draw_heatmap(grid, labels: list[list[str]], lengths: list[int], depths: list[float], title: str,
                 path: Path) -> None:  # fmt: skip
    """One heat map, every cell annotated, on a plain `Figure` (no pyplot)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import LinearSegmentedColormap
    from matplotlib.figure import Figure

    cmap = LinearSegmentedColormap.from_list("needle", list(HEATMAP_COLOURS)).with_extremes(bad="#D9D9D9")
    width = max(4.5, 1.0 + 0.85 * len(lengths))
    height = max(3.0, 1.2 + 0.45 * len(depths))
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
    for i in range(len(depths)):
        for j in range(len(lengths)):
            if labels[i][j]:
                ax.text(j, i, labels[i][j], ha="center", va="center", fontsize=8, color="black")
    ax.set_xticks(range(len(lengths)), [format_length(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{100 * d:g}%" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, label="hit rate", fraction=0.046, pad=0.04)
    # Margins fixed in inches (tick labels of a few characters, the colour bar and its label on the right, a
    # title of one or two lines): a tight-layout pass would draw every text once more, half of the figure's cost.
    title_in = 0.25 + 0.2 * (title.count("\n") + 1)
    fig.subplots_adjust(left=0.75 / width, right=1 - 0.85 / width, bottom=0.6 / height, top=1 - title_in / height)
    fig.savefig(path, dpi=110)


def needle_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per method/impl/variant (and varying setting), one column per context length, as text.

    Each entry is the hit rate pooled over depths (and seeds); a length with no
    ok row shows its status instead.
    """
    rows = _needle_rows(df)
    if rows.empty:
        return pd.DataFrame()
    lengths = sorted(int(n) for n in rows["seq_len"].dropna().unique())
    varying = _varying(rows)
    records = []
    for key, group in _groups(rows, [*GROUP_KEYS, *varying]):
        record = {k: str(key[k]) for k in (*GROUP_KEYS, *varying)}
        for n in lengths:
            cell = group[group["seq_len"].astype(int) == n]
            rate = None if cell.empty else _hit_rate(cell)
            record[format_length(n)] = "" if cell.empty else _status_label(cell) if rate is None else f"{rate:.2f}"
        records.append(record)
    return pd.DataFrame(records)
