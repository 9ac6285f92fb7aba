"""LRA-style tasks (issue 11, in progress): presets, validation, rows through the runner, the paper-layout table."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from bench.measure.hardware import HardwareProfile
from bench.measure.timing import TimingConfig
from bench.sweep import RunSettings, measure_cell
from tasks import TASKS, task_defaults
from tasks.base import Cell
from tasks.lra import PUBLISHED, lra_table

PROFILE = HardwareProfile("cpu", "cpu", "test cpu", {"float32": 1.0}, None, None, True, "test")
QUICK = TimingConfig(warmup=0, min_time_s=0.0, min_repeats=2, max_repeats=2)


def smoke_point(task: str, **overrides) -> dict:
    return TASKS[task].points(task_defaults(task), overrides)[0]


def test_a_preset_fills_the_point_and_explicit_keys_win():
    point = smoke_point("listops", lr=0.01, preset="cpu")
    presets = task_defaults("listops")["presets"]
    assert point["lr"] == 0.01 and point["steps"] == presets["cpu"]["steps"]
    assert point["seq_len"] == point["kv_len"] == presets["cpu"]["max_len"] and point["causal"] is False
    assert "presets" not in point  # the resolved values make the cell, not the table of presets
    assert smoke_point("pathfinder")["seq_len"] == presets_of("pathfinder")["smoke"]["resolution"] ** 2


def presets_of(task: str) -> dict:
    return task_defaults(task)["presets"]


@pytest.mark.parametrize(
    "overrides,message",
    [({"preset": "huge"}, "listops: unknown preset 'huge'; choose from: smoke, cpu, small, full"),
     ({"steps": 0}, "listops: steps must be an int >= 1, got 0"),
     ({"d_model": 30, "n_heads": 4}, "listops: d_model (30) must be divisible by n_heads (4)")],
)  # fmt: skip
def test_bad_points_fail_on_one_line(overrides, message):
    with pytest.raises(ValueError) as err:
        smoke_point("listops", **overrides)
    assert str(err.value) == message


def test_every_preset_resolves(tmp_path):
    for task in ("listops", "pathfinder"):
        for preset in presets_of(task):
            point = smoke_point(task, preset=preset)
            assert point["preset"] == preset and point["heads"] * point["head_dim"] == point["d_model"]


def run(task: str, method: str, tmp_path, **overrides) -> dict:
    cell = Cell(method, "reference", task, "cpu", smoke_point(task, **overrides), {})
    return measure_cell(cell, RunSettings(tmp_path, "run1", torch.device("cpu"), PROFILE, QUICK))


def test_listops_smoke_cell_through_the_runner(tmp_path):
    row = run("listops", "softmax", tmp_path)
    assert row["status"] == "ok", row["reason"]
    assert 0.0 <= row["accuracy"] <= 1.0 and 0.1 <= row["majority_rate"] < 1.0
    assert row["latency_ms"] > 0 and row["n_params"] > 0 and row["steps_done"] == 40
    assert "max_depth" in row["keys"] and "presets" not in row["keys"]


def test_a_causal_only_method_is_unsupported_with_its_reason(tmp_path):
    row = run("listops", "deltanet", tmp_path)
    assert row["status"] == "unsupported" and "non-causal" in row["reason"]


def test_lra_table_has_our_rows_and_the_published_ones():
    rows = pd.DataFrame([
        dict(task="listops", method="softmax", impl="reference", preset="cpu", status="ok", accuracy=0.4),
        dict(task="listops", method="softmax", impl="reference", preset="cpu", status="ok", accuracy=0.5),
        dict(task="pathfinder", method="softmax", impl="reference", preset="cpu", status="ok", accuracy=0.7),
        dict(task="pathfinder", method="linear", impl="reference", preset="cpu", status="error", accuracy=None),
    ])  # fmt: skip
    table = lra_table(rows)
    ours = table[table["method"].eq("softmax/reference")].iloc[0]
    assert (ours["ListOps"], ours["Pathfinder"], ours["Text"]) == ("45.00", "70.00", "–")
    assert ours["Avg"] == "57.50 (partial)"
    assert "linear/reference" not in set(table["method"])  # an error row measures nothing
    published = table[table["preset"].eq("published")]
    assert len(published) == len(PUBLISHED) and published.iloc[0]["Avg"] == "54.39"
    assert published.iloc[1][["ListOps", "Text", "Retrieval", "Image", "Pathfinder"]].tolist() == [
        "37.10", "65.02", "79.35", "38.20", "74.16"]  # fmt: skip


def write_fixtures(tmp_path) -> dict[str, dict]:
    """Small files in each source format, for the three dataset tasks (no download at test time)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    texts = [("good fun " if i % 2 else "bad dull ") * 3 + str(i) for i in range(96)]
    for split, rows in (("train", slice(0, 64)), ("test", slice(64, 96))):
        pq.write_table(pa.table({"text": texts[rows], "label": [i % 2 for i in range(96)][rows]}),
                       tmp_path / f"text_{split}.parquet")  # fmt: skip
        pixels = [rng.integers(0, 256, 3072, dtype=np.uint8).tolist() for _ in range(96)][rows]
        pq.write_table(pa.table({"pixels": pixels, "label": [i % 10 for i in range(96)][rows]}),
                       tmp_path / f"image_{split}.parquet")  # fmt: skip
    for split, n in (("train", 64), ("eval", 16), ("test", 32)):
        lines = [f"{float(i % 2)}\ta{i}\tb{i}\tpaper {i} cites\tpaper {i} {'yes' if i % 2 else 'no'}" for i in range(n)]
        (tmp_path / f"new_aan_pairs.{split}.tsv").write_text("\n".join(lines) + "\n")
    return {
        "lra_text": {"train": str(tmp_path / "text_train.parquet"), "test": str(tmp_path / "text_test.parquet")},
        "lra_image": {"train": str(tmp_path / "image_train.parquet"), "test": str(tmp_path / "image_test.parquet")},
        "lra_retrieval": {s: str(tmp_path / f"new_aan_pairs.{s}.tsv") for s in ("train", "eval", "test")},
    }


@pytest.mark.parametrize("task", ["lra_text", "lra_image", "lra_retrieval"])
def test_dataset_tasks_run_their_smoke_preset_on_local_files(task, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    files = write_fixtures(tmp_path)[task]
    row = run(task, "softmax", tmp_path / "rows", data_files=files)
    assert row["status"] == "ok", row["reason"]
    assert 0.0 <= row["accuracy"] <= 1.0 and row["majority_rate"] >= 0.5 * (1 if task != "lra_image" else 0.2)
    assert row["n_params"] > 0 and row["latency_ms"] > 0


def test_a_missing_dataset_is_a_one_line_row_that_says_how_to_provide_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    row = run("lra_text", "softmax", tmp_path, data_files=str(tmp_path / "missing.parquet"))
    assert row["status"] == "error" and "\n" not in row["reason"]
    assert "data_files" in row["reason"], row["reason"]


def test_learning_signal_exact_softmax_learns_listops_a_mixer_that_sees_nothing_does_not(tmp_path):
    """Depth-2 ListOps read at the first token (CLS pooling): softmax attention must gather the digits; the
    `identity` mixer leaves the first token with its own operator only, which says little about the value."""
    small = dict(max_depth=2, max_args=3, min_len=4, max_len=8, n_train=2000, n_val=200, n_test=400, d_model=32,
                 n_layers=2, steps=300, eval_every=100, lr=3e-3, pooling="cls")  # fmt: skip
    exact, blind = (run("listops", m, tmp_path / m, **small) for m in ("softmax", "identity"))
    assert exact["status"] == blind["status"] == "ok"
    majority = exact["majority_rate"]
    assert exact["accuracy"] > majority + 0.4, (exact["accuracy"], majority)  # 0.675 vs 0.12 when written
    assert blind["accuracy"] < majority + 0.15, (blind["accuracy"], majority)  # 0.195: the operator's prior only
