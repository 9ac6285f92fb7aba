"""LRA's Text, Image and Retrieval loaders on tiny fixtures written in the sources' own formats (parquet, JSON
lines, PNG bytes, pixel arrays, LRA's headerless AAN TSV), so the real `datasets` loading path runs offline;
a source that cannot be had is a one-line DatasetUnavailable, fast."""

from __future__ import annotations

import ast
import io
import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from tasks.lra_datasets import (
    IMAGE_VOCAB,
    TEXT_VOCAB,
    DatasetUnavailable,
    decode_bytes,
    lra_image,
    lra_retrieval,
    lra_text,
    rgb_to_gray,
)

TEXTS = ["a fine film", "café ☕ — terrible", "x" * 50, "ok", "\"quoted\"\tand tabbed", "meh", "great", "bad"]
LABELS = [1, 0, 1, 1, 0, 0, 1, 0]


def write_text_parquet(path: Path, texts: list[str], labels: list[int]) -> Path:
    pq.write_table(pa.table({"text": texts, "label": labels}), path)
    return path


def test_text_parquet_tokens_decode_to_the_text(tmp_path):
    train = write_text_parquet(tmp_path / "train.parquet", TEXTS, LABELS)
    test = write_text_parquet(tmp_path / "test.parquet", TEXTS[:3], LABELS[:3])
    files = {"train": str(train), "test": str(test)}
    data = lra_text("test", max_len=64, data_files=files, cache_dir=tmp_path / "cache")
    assert data.inputs.shape == (3, 64) and data.inputs.dtype == torch.int64
    assert data.labels.tolist() == LABELS[:3] and data.labels.dtype == torch.int64
    assert int(data.inputs.max()) < TEXT_VOCAB
    for row, text, n in zip(data.inputs, TEXTS[:3], data.lengths.tolist(), strict=True):
        assert decode_bytes(row) == text
        assert n == len(text.encode("utf-8"))
        assert (row[n:] == 0).all() and (row[:n] > 0).all()  # 0 is padding only, a byte is >= 1


def test_text_jsonl_limit_and_max_len(tmp_path):
    path = tmp_path / "imdb.jsonl"
    path.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in zip(TEXTS, LABELS, strict=True)))
    data = lra_text("test", max_len=8, data_files={"test": str(path)}, limit=5, cache_dir=tmp_path / "cache")
    assert data.inputs.shape == (5, 8) and len(data) == 5
    assert data.labels.tolist() == LABELS[:5]
    assert decode_bytes(data.inputs[0]) == TEXTS[0][:8]
    assert data.lengths.tolist() == [min(8, len(t.encode())) for t in TEXTS[:5]]
    assert decode_bytes(data.inputs[1], errors="ignore").startswith("caf")  # a cut inside a character


@pytest.mark.parametrize("suffix", [".csv", ".tsv"])
def test_text_csv_and_tsv_with_header(tmp_path, suffix):
    sep = "," if suffix == ".csv" else "\t"
    path = tmp_path / f"imdb{suffix}"
    pa_csv.write_csv(pa.table({"text": TEXTS[:4], "label": LABELS[:4]}), path,
                     pa_csv.WriteOptions(delimiter=sep, quoting_style="all_valid"))
    data = lra_text("test", max_len=64, data_files={"test": str(path)}, cache_dir=tmp_path / "cache")
    assert [decode_bytes(r) for r in data.inputs] == TEXTS[:4] and data.labels.tolist() == LABELS[:4]


def test_validation_is_carved_from_train_deterministically(tmp_path):
    texts = [f"review number {i}" for i in range(40)]
    files = {"train": str(write_text_parquet(tmp_path / "train.parquet", texts, [i % 2 for i in range(40)]))}
    kw = dict(max_len=32, data_files=files, cache_dir=tmp_path / "cache", val_fraction=0.25)
    train, val = lra_text("train", **kw), lra_text("validation", **kw)
    assert len(train) == 30 and len(val) == 10
    seen = {decode_bytes(r) for r in train.inputs} | {decode_bytes(r) for r in val.inputs}
    assert seen == set(texts)  # disjoint and complete
    assert torch.equal(lra_text("eval", **kw).inputs, val.inputs)  # LRA's name, same carve on every call
    other = lra_text("validation", **{**kw, "seed": 1})
    assert not torch.equal(other.inputs, val.inputs)


# --- image -------------------------------------------------------------------------------------------------


def tf_gray(r: int, g: int, b: int) -> int:
    """tf.image.rgb_to_grayscale on one uint8 pixel, written out: weights, then x 255.5 and truncate."""
    return int((0.2989 * r + 0.5870 * g + 0.1140 * b) / 255.0 * 255.5)


def cifar_like(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8) for _ in range(n)]
    images[0][0, 0] = (200, 100, 50)  # a known pixel
    images[0][0, 1] = (255, 255, 255)
    images[0][0, 2] = (0, 0, 0)
    return images


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_grayscale_matches_tensorflow_formula():
    assert rgb_to_gray(np.array([200, 100, 50], dtype=np.uint8)) == tf_gray(200, 100, 50) == 124
    assert rgb_to_gray(np.array([255, 255, 255], dtype=np.uint8)) == 255
    rng = np.random.default_rng(1)
    px = rng.integers(0, 256, size=(500, 3), dtype=np.uint8)
    ours = rgb_to_gray(px).astype(int)
    want = np.array([tf_gray(*map(int, p)) for p in px])
    assert (np.abs(ours - want) <= 1).all() and (ours == want).mean() > 0.99  # float32 vs float64 at boundaries


def test_image_parquet_png_bytes(tmp_path):
    images = cifar_like(4)
    structs = [{"bytes": png(im), "path": None} for im in images]
    pq.write_table(pa.table({"img": structs, "label": [3, 1, 4, 1]}), tmp_path / "test.parquet")
    data = lra_image("test", data_files={"test": str(tmp_path / "test.parquet")}, cache_dir=tmp_path / "cache")
    assert data.inputs.shape == (4, 1024) and data.inputs.dtype == torch.int64
    assert data.labels.tolist() == [3, 1, 4, 1]
    assert data.inputs[0, :3].tolist() == [124, 255, 0]
    assert int(data.inputs.max()) < IMAGE_VOCAB and int(data.inputs.min()) >= 0
    want = rgb_to_gray(images[2]).reshape(-1)
    assert data.inputs[2].tolist() == want.tolist()  # row-major pixel order


def test_image_hf_image_feature_and_raw_arrays(tmp_path):
    """A parquet written by `datasets` (Image feature: PIL on load), and CIFAR's flat CHW pixel rows."""
    import datasets

    images = cifar_like(6, seed=2)
    feats = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})
    ds = datasets.Dataset.from_dict({"img": [Image.fromarray(im) for im in images], "label": list(range(6))},
                                    features=feats)
    ds.to_parquet(str(tmp_path / "train.parquet"))
    kw = dict(data_files={"train": str(tmp_path / "train.parquet")}, cache_dir=tmp_path / "cache")
    data = lra_image("train", limit=2, val_fraction=0.5, **kw)
    assert data.inputs.shape == (2, 1024)
    val = lra_image("validation", val_fraction=0.5, **kw)
    train = lra_image("train", val_fraction=0.5, **kw)
    assert sorted(val.labels.tolist() + train.labels.tolist()) == list(range(6))

    flat = [im.transpose(2, 0, 1).reshape(-1).tolist() for im in images]  # CIFAR pickle layout: R, G, B planes
    pq.write_table(pa.table({"image": flat, "labels": list(range(6))}), tmp_path / "raw.parquet")
    raw = lra_image("test", data_files={"test": str(tmp_path / "raw.parquet")}, cache_dir=tmp_path / "cache")
    assert raw.inputs[0, :3].tolist() == [124, 255, 0]
    assert raw.inputs[5].tolist() == rgb_to_gray(images[5]).reshape(-1).tolist()


# --- retrieval ---------------------------------------------------------------------------------------------


PAIRS = [
    ("1.0", "W05-1203", "P98-1046", "We cite \"quoted\" prior work", "NA, 1998"),
    ("0.0", "2031", "0417", "Another paper body", "Unrelated abstract"),
    ("1.0", "J93-2004", "P03-1021", "x" * 30, "y" * 5),
]


def write_aan_tsv(path: Path, rows) -> Path:
    """LRA's new_aan_pairs.*.tsv: tab separated, no header, label id1 id2 text1 text2."""
    path.write_text("".join("\t".join(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_retrieval_reads_lra_tsv(tmp_path):
    files = {s: str(write_aan_tsv(tmp_path / f"new_aan_pairs.{s}.tsv", PAIRS)) for s in ("train", "eval", "test")}
    data = lra_retrieval("validation", max_len=16, data_files=files, cache_dir=tmp_path / "cache")
    assert data.inputs1.shape == data.inputs2.shape == (3, 16)
    assert data.labels.tolist() == [1, 0, 1] and data.labels.dtype == torch.int64
    assert decode_bytes(data.inputs1[0]) == PAIRS[0][3][:16]
    assert decode_bytes(data.inputs2[0]) == PAIRS[0][4]  # "NA" stays text
    assert decode_bytes(data.inputs2[1]) == "Unrelated abstra"
    assert data.lengths1.tolist() == [16, 16, 16] and data.lengths2[2] == 5
    assert data.stacked().shape == (3, 2, 16) and data.concatenated().shape == (3, 32)
    test = lra_retrieval("test", max_len=64, data_files=files, limit=2, cache_dir=tmp_path / "cache")
    assert len(test) == 2 and decode_bytes(test.inputs1[0]) == PAIRS[0][3]

    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text("".join(json.dumps({"label": int(float(r[0])), "text1": r[3], "text2": r[4]}) + "\n"
                             for r in PAIRS))
    other = lra_retrieval("train", max_len=16, data_files={"train": str(jsonl), "validation": str(jsonl)},
                          cache_dir=tmp_path / "cache")
    assert torch.equal(other.inputs1, data.inputs1) and torch.equal(other.labels, data.labels)


# --- unavailable -------------------------------------------------------------------------------------------


def test_missing_dataset_is_one_line_and_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets
    from huggingface_hub import constants

    # As if `datasets` had been imported before the variables were set: the loader must still go offline.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    started = time.perf_counter()
    with pytest.raises(DatasetUnavailable) as err:
        lra_text("train", cache_dir=tmp_path / "cache")
    assert time.perf_counter() - started < 5  # no network retries
    msg = str(err.value)
    assert "\n" not in msg and "lra_text" in msg and "'imdb'" in msg and "data_files=" in msg
    assert err.value.__cause__ is None and err.value.__suppress_context__  # no chained traceback
    assert isinstance(err.value, ValueError)
    assert datasets.config.HF_HUB_OFFLINE is False  # put back as it was

    with pytest.raises(DatasetUnavailable, match=r"^lra_image: .*does not exist.*data_files=") as err:
        lra_image("train", data_files={"train": str(tmp_path / "nope.parquet")})
    assert "\n" not in str(err.value)
    with pytest.raises(DatasetUnavailable, match="no hub copy"):
        lra_retrieval("train")


def test_module_imports_datasets_lazily_and_registers_nothing():
    """`import tasks` imports every module of tasks/ for discovery: this one must not pay for `datasets` then,
    nor register a task (the task classes live elsewhere). Read from the source, so another module's
    imports cannot make this pass or fail."""
    import tasks.lra_datasets as mod

    tree = ast.parse(Path(mod.__file__).read_text())
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = {a.name.split(".")[0] for n in top for a in n.names} | {
        (n.module or "").split(".")[0] for n in top if isinstance(n, ast.ImportFrom)}
    assert "datasets" not in names and "PIL" not in names
    assert "register_task" not in Path(mod.__file__).read_text()
