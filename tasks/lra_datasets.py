"""Data for three Long Range Arena tasks, from the hub or from local files in LRA's released formats.

LRA's Text, Image and Retrieval tasks use public data sets, not generated
ones, so the benchmark must read them where they are: through `datasets` by
hub name on a connected machine, or from local files (`data_files=`) on one
that is not. Tests write small fixtures in the same schemas into a temp dir,
so the real loading code is what they exercise.

- `lra_text`: IMDB sentiment, byte level. Tokens are the UTF-8 bytes + 1, so 0
  stays the pad id (vocab `TEXT_VOCAB` = 257), which is what LRA's
  `tfds.deprecated.text.ByteTextEncoder` does; the byte string is cut at
  `max_len` (LRA: 4,000 at `full`; a cut may split a multi-byte character).
  LRA reads tfds `imdb_reviews` (fields text, label); the hub's `imdb` /
  `stanfordnlp/imdb` and local files use the columns `text` and `label`.
- `lra_image`: CIFAR-10 as 1,024 grayscale pixel tokens. The grayscale value
  is exactly `tf.image.rgb_to_grayscale` on uint8 (what LRA calls):
  f = (0.2989 R + 0.5870 G + 0.1140 B) / 255 in float32, then
  `convert_image_dtype` back to uint8, which scales by 255.5 and truncates
  (not `round(f * 255)`: the two differ on some pixels). The token is the
  pixel value itself, no +1 shift (vocab `IMAGE_VOCAB` = 256), as in LRA: every
  image is exactly H*W tokens, so there is no padding, and a model on this
  data must set `pad_id=None` (0 is black, not padding).
- `lra_retrieval`: AAN citation pairs, byte level like the text task, each
  document cut at `max_len` (LRA: 4,000). LRA releases
  `new_aan_pairs.{train,eval,test}.tsv`: tab separated, no header, columns
  label, id1, id2, text1, text2, label written as a float ("1.0"); that is
  read exactly. Parquet / JSON lines with columns `label`, `text1`, `text2`
  work too. No hub copy of the AAN pairs is known to us: `source=` takes any
  hub name with those columns, but there is no default.

Splits are named train / validation / test; LRA's `eval` (and `valid`, `dev`)
mean validation. When the source has no validation split (tfds IMDB, hub
CIFAR-10), validation is carved from train: a seeded permutation of the train
rows puts `val_fraction` of them in validation and the rest in train, so
train and validation never overlap and the carve is the same on every
machine. (LRA's own code, as far as we know, selects on the test split for
these tasks; carving keeps the test split untouched by checkpoint choice.)
`limit` keeps the first n examples of the split after the carve (smoke / cpu
presets), and only those are tokenised.

A data set that cannot be had (no local files and the hub unreachable or
`HF_DATASETS_OFFLINE=1`, or a named file that does not exist) raises
`DatasetUnavailable`, a ValueError with a one-line message that says how to
provide it. `datasets` is imported inside the loaders only: `import tasks`
imports this module for task discovery and must stay cheap.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

PAD_ID = 0
BYTE_OFFSET = 1  # token = byte + 1, so 0 is free for padding (ByteTextEncoder's convention)
TEXT_VOCAB = 256 + BYTE_OFFSET
IMAGE_VOCAB = 256
GRAY_WEIGHTS = (0.2989, 0.5870, 0.1140)  # tf.image.rgb_to_grayscale

SPLITS = ("train", "validation", "test")
SPLIT_ALIASES = {"train": "train", "validation": "validation", "valid": "validation", "val": "validation",
                 "eval": "validation", "dev": "validation", "test": "test"}
RETRIEVAL_TSV_COLUMNS = ("label", "id1", "id2", "text1", "text2")  # LRA's new_aan_pairs.*.tsv, no header
DEFAULT_SOURCES = {"lra_text": "imdb", "lra_image": "cifar10", "lra_retrieval": None}
HOW = {
    "lra_text": "parquet/jsonl/csv/tsv with columns text,label",
    "lra_image": "parquet/arrow with an image column (img|image: PIL, PNG bytes or pixel array) and label",
    "lra_retrieval": "LRA's new_aan_pairs.{train,eval,test}.tsv, or parquet/jsonl with label,text1,text2",
}
FORMATS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv", ".tsv": "csv",
           ".arrow": "arrow"}

DataFiles = str | Path | Sequence[str | Path] | Mapping[str, str | Path | Sequence[str | Path]]


class DatasetUnavailable(ValueError):
    """The data set cannot be had here; the message is one line that says how to provide it."""


@dataclass
class LRAData:
    """One split of a single-sequence task: `inputs` (n, max_len) int64 padded with PAD_ID (image: no
    padding), `labels` (n,) int64, `lengths` (n,) int64 tokens before padding."""

    inputs: torch.Tensor
    labels: torch.Tensor
    lengths: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class LRAPairData:
    """One split of the retrieval task: `inputs1`, `inputs2` (n, max_len) int64 padded with PAD_ID,
    `labels` (n,) int64 (1: document 1 cites document 2), `lengths1`, `lengths2` (n,) int64."""

    inputs1: torch.Tensor
    inputs2: torch.Tensor
    labels: torch.Tensor
    lengths1: torch.Tensor
    lengths2: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def stacked(self) -> torch.Tensor:
        """(n, 2, max_len): both documents in one tensor, so the trainer's batch slicing carries pairs
        unchanged into `DualEncoderClassifier.labelled_logits`."""
        return torch.stack([self.inputs1, self.inputs2], dim=1)

    def concatenated(self) -> torch.Tensor:
        """(n, 2 * max_len): the same pairs side by side; `DualEncoderClassifier` splits them in the middle.
        With this layout the trainer's tokens/s (batch * shape[1]) counts every token of both documents."""
        return torch.cat([self.inputs1, self.inputs2], dim=1)


# --- tokens ---------------------------------------------------------------------------------------------


def encode_bytes(texts: Iterable[str | bytes], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (n, max_len) int64, lengths (n,)): UTF-8 bytes + BYTE_OFFSET, cut at max_len, padded with 0."""
    texts = list(texts)
    out = np.zeros((len(texts), max_len), dtype=np.int64)
    lengths = np.zeros(len(texts), dtype=np.int64)
    for i, text in enumerate(texts):
        raw = (text if isinstance(text, bytes) else str(text).encode("utf-8"))[:max_len]
        out[i, : len(raw)] = np.frombuffer(raw, dtype=np.uint8).astype(np.int64) + BYTE_OFFSET
        lengths[i] = len(raw)
    return torch.from_numpy(out), torch.from_numpy(lengths)


def decode_bytes(ids: torch.Tensor | Sequence[int], errors: str = "strict") -> str:
    """The text of one row of `encode_bytes` (padding dropped); `errors="ignore"` for a cut character."""
    values = [int(i) - BYTE_OFFSET for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids) if int(i)]
    return bytes(values).decode("utf-8", errors=errors)


def rgb_to_gray(rgb: np.ndarray) -> np.ndarray:
    """uint8 (..., 3) -> uint8 (...) exactly as tf.image.rgb_to_grayscale: float32 in [0, 1], weighted sum,
    then convert_image_dtype back to uint8 (multiply by 255.5 and truncate)."""
    flt = rgb.astype(np.float32) / np.float32(255.0)
    gray = flt @ np.asarray(GRAY_WEIGHTS, dtype=np.float32)
    return (gray * np.float32(255.5)).astype(np.uint8)


def _pixels(value: Any) -> np.ndarray:
    """One image as uint8 (H, W) grayscale, from a PIL image, {'bytes': PNG...}, raw bytes or an array.

    A flat array of 3 * 1024 values is CIFAR-10's own layout (the python pickle: all R, then G, then B,
    32x32 each); a flat 1024 is already gray; (H, W, 3) is RGB; (H, W) is gray.
    """
    from PIL import Image

    if isinstance(value, dict):
        if value.get("bytes") is None and value.get("path"):
            value = Image.open(value["path"])
        else:
            value = value.get("bytes")
    if isinstance(value, (bytes, bytearray)):
        value = Image.open(io.BytesIO(value))
    if isinstance(value, Image.Image):
        value = np.asarray(value.convert("L") if value.mode in ("L", "1") else value.convert("RGB"))
    arr = np.asarray(value)
    if arr.ndim == 1 and arr.size == 3 * 1024:
        arr = arr.reshape(3, 32, 32).transpose(1, 2, 0)
    elif arr.ndim == 1 and arr.size == 1024:
        arr = arr.reshape(32, 32)
    if arr.ndim == 3 and arr.shape[-1] == 3:
        return rgb_to_gray(arr.astype(np.uint8))
    if arr.ndim == 2:
        return arr.astype(np.uint8)
    raise ValueError(f"lra_image: cannot read an image of shape {arr.shape}; want (H, W, 3), (H, W) or flat 3072")


# --- loading ----------------------------------------------------------------------------------------------


def _split_name(split: str) -> str:
    try:
        return SPLIT_ALIASES[split]
    except KeyError:
        raise ValueError(f"unknown split {split!r}; choose from: {', '.join(SPLITS)} (or eval/valid/dev)") from None


def _as_files(data_files: DataFiles) -> dict[str, list[str]]:
    """data_files as {split: [paths]}; a bare path or list is the train split (the `datasets` convention)."""
    if isinstance(data_files, Mapping):
        items = data_files.items()
    else:
        items = [("train", data_files)]
    files: dict[str, list[str]] = {}
    for split, paths in items:
        listed = [paths] if isinstance(paths, (str, Path)) else list(paths)
        files.setdefault(_split_name(split), []).extend(str(p) for p in listed)
    return files


def _format(task: str, files: dict[str, list[str]]) -> str:
    suffixes = {Path(p).suffix.lower() for paths in files.values() for p in paths}
    formats = {FORMATS.get(s) for s in suffixes}
    if len(formats) != 1 or None in formats:
        raise ValueError(f"{task}: cannot tell the format of {sorted(suffixes)}; use one of "
                         f"{', '.join(sorted(FORMATS))} for every file")
    fmt = formats.pop()
    assert fmt is not None
    return fmt


@contextmanager
def _offline_from_env(datasets: Any) -> Iterator[None]:
    """Honour HF_DATASETS_OFFLINE / HF_HUB_OFFLINE as they are now, not as they were at import.

    `datasets` and `huggingface_hub` read them once, when first imported; a caller (or a test) that sets
    them later would otherwise get a network attempt with retries (~20 s here) before the error. This
    only ever turns offline mode on, and puts the previous values back.
    """
    on = any(os.environ.get(k, "").upper() in ("1", "ON", "YES", "TRUE") for k in ("HF_DATASETS_OFFLINE",
                                                                                   "HF_HUB_OFFLINE"))
    if not on:
        yield
        return
    from huggingface_hub import constants

    saved = (datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE, constants.HF_HUB_OFFLINE)
    datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE, constants.HF_HUB_OFFLINE = saved


def _load(task: str, source: str | None, data_files: DataFiles | None, cache_dir: str | Path | None):
    """The source as a `datasets.DatasetDict` keyed by our split names, or DatasetUnavailable (one line)."""
    import datasets  # lazy: `import tasks` must not pay for it

    kwargs: dict[str, Any] = {"cache_dir": str(cache_dir) if cache_dir is not None else None}
    if data_files is not None:
        files = _as_files(data_files)
        missing = [p for paths in files.values() for p in paths if not Path(p).exists()]
        if missing:
            raise DatasetUnavailable(f"{task}: file {missing[0]} does not exist; pass data_files= ({HOW[task]})")
        fmt = _format(task, files)
        tsv = any(Path(p).suffix.lower() == ".tsv" for paths in files.values() for p in paths)
        if tsv:
            kwargs["delimiter"] = "\t"
        if task == "lra_retrieval" and tsv:
            # LRA's release: no header, these five columns, text never quoted (a quote is just a character).
            # Features pin the types: an id or a text that looks like a number stays a string.
            kwargs.update(column_names=list(RETRIEVAL_TSV_COLUMNS), header=None, quoting=3, keep_default_na=False,
                          features=datasets.Features({c: datasets.Value("float64" if c == "label" else "string")
                                                      for c in RETRIEVAL_TSV_COLUMNS}))
        where, args = f"data_files {files}", (fmt,)
        kwargs["data_files"] = files
    else:
        source = source or DEFAULT_SOURCES[task]
        if source is None:
            raise DatasetUnavailable(f"{task}: no hub copy is known; pass data_files= ({HOW[task]})")
        where, args = f"dataset {source!r}", (source,)

    try:
        with _offline_from_env(datasets):
            loaded = datasets.load_dataset(*args, **kwargs)
    except (ConnectionError, FileNotFoundError, OSError, datasets.exceptions.DatasetNotFoundError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DatasetUnavailable(
            f"{task}: {where} is not available ({reason}); pass data_files=... ({HOW[task]}) "
            "or run on a connected machine"
        ) from None
    return datasets.DatasetDict({_split_name(name): ds for name, ds in loaded.items() if name in SPLIT_ALIASES})


def _rows(task: str, dsets, split: str, val_fraction: float, seed: int, limit: int | None):
    """(dataset, row indices) of `split`, carving validation from train when the source has none."""
    split = _split_name(split)
    if split in ("train", "validation") and "validation" not in dsets and "train" in dsets:
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"{task}: val_fraction must be in (0, 1), got {val_fraction}")
        n = len(dsets["train"])
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
        n_val = max(1, round(val_fraction * n))
        idx = order[:n_val] if split == "validation" else order[n_val:]
        ds = dsets["train"]
    elif split in dsets:
        ds = dsets[split]
        idx = list(range(len(ds)))
    else:
        raise DatasetUnavailable(f"{task}: the source has no {split!r} split (it has {', '.join(dsets)}); "
                                 f"pass data_files={{'{split}': ...}} ({HOW[task]})")
    if limit is not None:
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        idx = idx[:limit]
    return ds, idx


def _column(task: str, ds, wanted: Sequence[str]) -> str:
    for name in wanted:
        if name in ds.column_names:
            return name
    raise ValueError(f"{task}: no column {' or '.join(wanted)} in the data (columns: {', '.join(ds.column_names)})")


def _labels(values: Iterable[Any]) -> torch.Tensor:
    """int64 labels; LRA's TSV writes them as floats ("1.0")."""
    return torch.tensor([int(float(v)) for v in values], dtype=torch.int64)


def _check_len(max_len: int) -> None:
    if int(max_len) < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")


def lra_text(split: str, max_len: int = 4000, *, source: str | None = None, data_files: DataFiles | None = None,
             limit: int | None = None, val_fraction: float = 0.1, seed: int = 0,
             text_column: str = "text", label_column: str = "label",
             cache_dir: str | Path | None = None) -> LRAData:
    """Byte-level IMDB sentiment: (n, max_len) byte tokens (+1, 0 = pad) and 0/1 labels.

    `source`: a hub name (default `imdb`), used when `data_files` is None. `data_files`: a path, list, or
    {split: path(s)} of parquet / json(l) / csv / tsv (with a header) holding `text_column` and `label_column`.
    """
    _check_len(max_len)
    ds, idx = _rows("lra_text", _load("lra_text", source, data_files, cache_dir), split, val_fraction, seed, limit)
    text_col, label_col = _column("lra_text", ds, [text_column]), _column("lra_text", ds, [label_column])
    sub = ds.select(idx)
    inputs, lengths = encode_bytes(sub[text_col], max_len)
    return LRAData(inputs=inputs, labels=_labels(sub[label_col]), lengths=lengths)


def lra_image(split: str, *, source: str | None = None, data_files: DataFiles | None = None,
              limit: int | None = None, val_fraction: float = 0.1, seed: int = 0,
              image_column: str | None = None, label_column: str | None = None,
              cache_dir: str | Path | None = None) -> LRAData:
    """CIFAR-10 as H*W grayscale pixel tokens (LRA's uint8 conversion; token = pixel value, vocab 256).

    `source`: a hub name (default `cifar10`; `uoft-cs/cifar10` is the same, columns img/label).
    `data_files`: parquet / arrow with an image column (`img` or `image`, or `image_column`) holding PIL
    images, {'bytes': PNG} structs, raw bytes or pixel arrays, and a `label` (or `labels`) column.
    """
    ds, idx = _rows("lra_image", _load("lra_image", source, data_files, cache_dir), split, val_fraction, seed, limit)
    img_col = _column("lra_image", ds, [image_column] if image_column else ["img", "image", "pixels"])
    label_col = _column("lra_image", ds, [label_column] if label_column else ["label", "labels"])
    sub = ds.select(idx)
    images = [_pixels(v).reshape(-1) for v in sub[img_col]]
    sizes = {im.size for im in images}
    if len(sizes) > 1:
        raise ValueError(f"lra_image: images differ in size ({sorted(sizes)} pixels); LRA's are all 32x32")
    n_pix = sizes.pop() if sizes else 1024
    inputs = torch.from_numpy(np.stack(images).astype(np.int64)) if images else torch.zeros(0, n_pix, dtype=torch.int64)
    return LRAData(inputs=inputs, labels=_labels(sub[label_col]),
                   lengths=torch.full((len(images),), n_pix, dtype=torch.int64))


def lra_retrieval(split: str, max_len: int = 4000, *, source: str | None = None,
                  data_files: DataFiles | None = None, limit: int | None = None, val_fraction: float = 0.1,
                  seed: int = 0, cache_dir: str | Path | None = None) -> LRAPairData:
    """AAN citation pairs, byte level: two (n, max_len) token tensors and 0/1 labels (1: doc 1 cites doc 2).

    `data_files`: LRA's `new_aan_pairs.{train,eval,test}.tsv` as {'train': ..., 'eval': ..., 'test': ...}
    (headerless; label, id1, id2, text1, text2), or parquet / jsonl with columns label, text1, text2.
    `source`: a hub name with those columns (no default: we know of no hub copy).
    """
    _check_len(max_len)
    dsets = _load("lra_retrieval", source, data_files, cache_dir)
    ds, idx = _rows("lra_retrieval", dsets, split, val_fraction, seed, limit)
    cols = [_column("lra_retrieval", ds, [c]) for c in ("text1", "text2", "label")]
    sub = ds.select(idx)
    in1, len1 = encode_bytes(sub[cols[0]], max_len)
    in2, len2 = encode_bytes(sub[cols[1]], max_len)
    return LRAPairData(inputs1=in1, inputs2=in2, labels=_labels(sub[cols[2]]), lengths1=len1, lengths2=len2)
