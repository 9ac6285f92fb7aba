"""The perplexity views (`tasks/lm_views.py`): table means and Δ vs softmax, protocol labels, and the plot files."""

from __future__ import annotations

import json
import math

import pandas as pd

from tasks.lm_views import TABLE_COLUMNS, loss_curve_plots, parse_curve, perplexity_table, swap_context_plots

PRESET = "shakespeare_char_cpu"
SETTING = f"{PRESET} · shakespeare/char"


def curve(losses: list[float]) -> str:
    return json.dumps([
        {"step": 100 * i, "seconds": 2.0 * i, "val_loss": loss, "train_loss": loss - 0.1}
        for i, loss in enumerate(losses)
    ])


def lm_row(method: str, seed: int, ppl: float, loss: float, bpc: float, impl: str = "reference", **kw) -> dict:
    row = dict(method=method, impl=impl, task="lm", status="ok", seed=seed, preset=PRESET, source="shakespeare",
               tokenizer="char", context=256, val_loss=loss, perplexity=ppl, bits_per_char=bpc,
               train_seconds=10.0, curve=curve([3.0, 2.0, loss]))
    row.update(kw)
    return row


def swap_row(method: str, seed: int, ctx: int, swap: str, ppl: float, soft: float, **kw) -> dict:
    row = dict(method=method, impl="reference", task="lm_swap", status="ok", seed=seed, base_preset=PRESET,
               source="shakespeare", tokenizer="char", eval_context=ctx, swap=swap, val_loss=1.0, perplexity=ppl,
               bits_per_char=1.5, softmax_perplexity=soft, ppl_increase=ppl - soft)
    row.update(kw)
    return row


def lm_rows() -> pd.DataFrame:
    return pd.DataFrame([
        lm_row("softmax", 0, 4.0, 1.4, 2.0),
        lm_row("softmax", 1, 5.0, 1.6, 2.2),
        lm_row("softmax", 0, 5.5, 1.7, 2.4, impl="torch"),
        lm_row("linear", 0, 6.0, 1.8, 2.6),
        lm_row("linear", 1, 6.5, 1.9, 2.7),
        # Not ok: no metrics, must not count as a seed nor pull the mean.
        lm_row("linear", 2, float("nan"), float("nan"), float("nan"), status="error", curve=None),
        # Another setting with no softmax run: no Δ.
        lm_row("linear", 0, 9.0, 2.2, 3.2, preset="tiny/bpe cpu", tokenizer="bpe"),
    ])


def swap_rows() -> pd.DataFrame:
    rows = []
    for seed, bump in ((0, 0.0), (1, 0.2)):
        for ctx, soft in ((128, 4.0), (256, 3.8), (512, 3.7)):
            rows.append(swap_row("performer", seed, ctx, "all", soft + 1.0 + bump, soft))
            rows.append(swap_row("performer", seed, ctx, "last 1", soft + 0.3 + bump, soft))
    rows.append(swap_row("performer", 2, 128, "all", float("nan"), 4.0, status="unsupported"))
    return pd.DataFrame(rows)


def line(table: pd.DataFrame, **match) -> pd.Series:
    hit = table
    for key, value in match.items():
        hit = hit[hit[key] == value]
    assert len(hit) == 1, match
    return hit.iloc[0]


def test_train_lines_average_seeds_and_compare_to_softmax_over_impls():
    table = perplexity_table(lm_rows())
    assert list(table.columns) == TABLE_COLUMNS
    assert table.map(lambda v: isinstance(v, str)).all().all()
    soft = line(table, method="softmax", impl="reference", setting=SETTING)
    assert soft[["protocol", "context", "val loss (nats) ↓", "perplexity ↓", "bits/char ↓", "seeds"]].tolist() == [
        "train", "256", "1.500", "4.50", "2.100", "2"]
    linear = line(table, method="linear", setting=SETTING)
    assert linear[["val loss (nats) ↓", "perplexity ↓", "bits/char ↓", "seeds"]].tolist() == [
        "1.850", "6.25", "2.650", "2"]  # the error row (seed 2) is left out
    # Softmax reference = mean over impls of their seed means: (4.5 + 5.5) / 2 = 5.0, not the row mean 4.83.
    assert linear["Δ perplexity vs softmax ↓"] == "+1.25"
    assert soft["Δ perplexity vs softmax ↓"] == "-0.50"
    other = line(table, setting="tiny/bpe cpu · shakespeare/bpe")
    assert other["Δ perplexity vs softmax ↓"] == "–" and other["perplexity ↓"] == "9.00"
    # Within a setting and context, best perplexity first.
    assert table[table.setting == SETTING]["perplexity ↓"].tolist() == ["4.50", "5.50", "6.25"]


def test_swap_lines_are_labelled_by_protocol_and_ordered_after_training():
    rows = pd.concat([lm_rows(), swap_rows()], ignore_index=True)
    table = perplexity_table(rows)
    ours = table[table.setting == SETTING]
    assert ours["protocol"].tolist()[:3] == ["train"] * 3
    assert ours["protocol"].tolist()[3:] == ["swap: all layers"] * 3 + ["swap: last 1 layer"] * 3
    assert ours[ours.protocol == "swap: all layers"]["context"].tolist() == ["128", "256", "512"]
    all_128 = line(table, protocol="swap: all layers", context="128")
    # Seeds 0 and 1: 5.0 and 5.2 against softmax 4.0; the unsupported seed 2 is not counted.
    assert all_128[["perplexity ↓", "Δ perplexity vs softmax ↓", "seeds"]].tolist() == ["5.10", "+1.10", "2"]
    assert line(table, protocol="swap: last 1 layer", context="512")["Δ perplexity vs softmax ↓"] == "+0.40"


def test_other_tasks_and_non_ok_rows_are_ignored():
    stray = dict(method="softmax", impl="reference", task="mqar", status="ok", seed=0, perplexity=1.0,
                 val_loss=0.0, preset=PRESET, source="shakespeare", tokenizer="char", context=256)
    with_stray = perplexity_table(pd.concat([lm_rows(), pd.DataFrame([stray])], ignore_index=True))
    pd.testing.assert_frame_equal(with_stray, perplexity_table(lm_rows()))
    assert perplexity_table(pd.DataFrame([stray])).empty
    failed = lm_rows().assign(status="error")
    for empty in (perplexity_table(pd.DataFrame()), perplexity_table(failed)):
        assert empty.empty and list(empty.columns) == TABLE_COLUMNS
    assert loss_curve_plots(failed, "unused") == [] and swap_context_plots(lm_rows(), "unused") == []


def test_loss_curves_one_file_per_setting_and_corrupt_curves_skipped(tmp_path):
    rows = lm_rows()
    corrupt = pd.DataFrame([
        lm_row("softmax", 0, 4.0, 1.4, 2.0, preset="broken", curve="[{\"step\": 0, \"val_l"),
        lm_row("linear", 0, 4.0, 1.4, 2.0, preset="broken", curve=None),
    ])
    paths = loss_curve_plots(pd.concat([rows, corrupt], ignore_index=True), tmp_path / "figs")
    assert [p.name for p in paths] == [
        "lm_loss_curves_shakespeare_char_cpu_shakespeare_char.png",
        "lm_loss_curves_tiny_bpe_cpu_shakespeare_bpe.png",
    ]
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths)
    assert parse_curve("not json") == [] and parse_curve(None) == [] and parse_curve('{"step": 1}') == []
    (point,) = parse_curve('[{"step": 5, "val_loss": 2.5}, {"step": "x"}, 7]')  # bad points dropped, not the row
    assert (point["step"], point["val_loss"]) == (5.0, 2.5) and math.isnan(point["seconds"])


def test_swap_plots_one_file_per_swap_setting(tmp_path):
    rows = pd.concat([swap_rows(), lm_rows()], ignore_index=True)
    paths = swap_context_plots(rows, tmp_path)
    assert [p.name for p in paths] == [
        "lm_swap_ppl_vs_context_shakespeare_char_cpu_shakespeare_char_all.png",
        "lm_swap_ppl_vs_context_shakespeare_char_cpu_shakespeare_char_last_1.png",
    ]
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths)
