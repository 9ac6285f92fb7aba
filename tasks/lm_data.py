"""Text corpora and tokenizers for the language-model perplexity task.

The perplexity task trains a small language model with each attention method and reports its loss on held-out
text, so every method of a sweep must read the same characters, split the same way, as the published points of
comparison do. Three ways in:

- a **local corpus** (`EMBEDDED`), read from the shared data folder (`data_root()`, or `data_dir=`) and checked
  against its sha256 on every load, so a result row always names exactly the text it was measured on:
  `shakespeare` is Tiny Shakespeare split exactly as nanoGPT's `data/shakespeare_char/prepare.py` does (first 90%
  of the characters train, last 10% validation); `wikitext2` trains on WikiText-2's *validation* file and
  validates on its *test* file. That is a CPU-scale stand-in, not WikiText-2's protocol: the shared data holds
  no train split, and the rows' `dataset` column says so.
- **local text files** (`data_files=`), read through `datasets`' `text` loader, one document per file.
- a **hub name** (`"wikitext/wikitext-2-raw-v1"`), through `datasets.load_dataset` on a connected machine.

Tokenizers are nanoGPT's character level (`char`), UTF-8 bytes (`byte`) and a byte-level BPE trained here on
the train split (`bpe`, needs the optional `tokenizers` package; nothing is downloaded). Their losses are
made comparable by `bits_per_char`. Anything that cannot be had raises `CorpusError`, a ValueError whose
message is one line that says how to fix it. `datasets` and `tokenizers` are imported inside the functions
that need them: `import tasks` imports this module for task discovery and must stay cheap.
"""

from __future__ import annotations

import abc
import functools
import hashlib
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tasks.lra_datasets import _offline_from_env

DATA_ENV = "ATTNBENCH_DATA"
TRAIN_FRACTION = 0.9  # nanoGPT's prepare.py: train = data[:int(n * 0.9)]
TOKENIZERS = ("char", "byte", "bpe")
SPLITS = ("train", "validation")
VALIDATION_ALIASES = ("validation", "valid", "val", "eval", "dev", "test")  # preference order on the hub
TEXT_COLUMN = "text"
INSTALL_TOKENIZERS = "pip install tokenizers (or the `lm` extra: pip install -e '.[lm]')"

DataFiles = str | Path | Sequence[str | Path] | Mapping[str, str | Path | Sequence[str | Path]]


class CorpusError(ValueError):
    """The corpus (or the tokenizer's package) cannot be had here; the message is one line that says how."""


@dataclass(frozen=True)
class LocalFile:
    """One file of the shared data folder, by path relative to the data root, and its expected sha256."""

    path: str
    sha256: str


@dataclass(frozen=True)
class LocalCorpus:
    """A corpus in the shared data folder. Without a `validation` file, the last 10% of `train`'s characters
    are the validation split (nanoGPT's carve). `about` is what result rows say the data set is."""

    train: LocalFile
    validation: LocalFile | None
    about: str


EMBEDDED: dict[str, LocalCorpus] = {
    "shakespeare": LocalCorpus(
        train=LocalFile("tinyshakespeare/input.txt",
                        "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"),
        validation=None,
        about="shakespeare: tinyshakespeare/input.txt, first 90% / last 10%",
    ),
    "wikitext2": LocalCorpus(
        train=LocalFile("wikitext-2/valid.txt", "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8"),
        validation=LocalFile("wikitext-2/test.txt",
                             "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0"),
        about="wikitext2 (CPU-scale stand-in): train on wikitext-2/valid.txt, validate on wikitext-2/test.txt",
    ),
}


def data_root() -> Path:
    """$ATTNBENCH_DATA if set, else `../shared/data` next to the repository (where the shared corpora live)."""
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parent.parent.parent / "shared" / "data"


# --- texts ------------------------------------------------------------------------------------------------


def _carve(text: str) -> dict[str, str]:
    """nanoGPT's split: the first 90% of the characters train, the rest validate."""
    cut = int(len(text) * TRAIN_FRACTION)
    return {"train": text[:cut], "validation": text[cut:]}


def _read_checked(name: str, root: Path, file: LocalFile) -> str:
    """The file's text, after checking its sha256: a different file must never pass for the named corpus."""
    path = root / file.path
    if not path.is_file():
        raise CorpusError(f"{name}: {path} not found (looked under {root}); set {DATA_ENV}=<folder> or "
                          f"task.data_dir=<folder> to a folder holding {file.path}")
    raw = path.read_bytes()
    got = hashlib.sha256(raw).hexdigest()
    if got != file.sha256:
        raise CorpusError(f"{name}: {path} has sha256 {got[:12]}, expected {file.sha256[:12]}; "
                          "the file is altered or another version")
    # Universal newlines, as nanoGPT's open(...).read() and the `text` loader read a file.
    return raw.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")


def _split_of(name: str) -> str:
    if name == "train":
        return "train"
    if name in VALIDATION_ALIASES:
        return "validation"
    raise ValueError(f"unknown split {name!r}; choose from: train, validation (or {', '.join(VALIDATION_ALIASES[1:])})")


def _as_files(data_files: DataFiles) -> dict[str, list[str]]:
    """data_files as {train|validation: [paths]}; a bare path or list is the train split (`datasets`' rule)."""
    items = data_files.items() if isinstance(data_files, Mapping) else [("train", data_files)]
    files: dict[str, list[str]] = {}
    for name, paths in items:
        split = _split_of(str(name))
        if split in files:
            raise ValueError(f"data_files names the {split} split twice (as {name!r} too); give it one entry")
        files[split] = [str(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
    if "train" not in files:
        raise ValueError("data_files has no train split; give a path, a list, or {'train': ..., 'validation': ...}")
    return files


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _from_files(data_files: DataFiles, cache_dir: str | Path | None) -> tuple[dict[str, str], str]:
    import datasets  # lazy: `import tasks` must not pay for it

    files = _as_files(data_files)
    missing = [p for paths in files.values() for p in paths if not Path(p).is_file()]
    if missing:
        raise CorpusError(f"data_files: {missing[0]} does not exist; pass existing text files")
    try:
        loaded = datasets.load_dataset("text", data_files=files, sample_by="document",
                                       cache_dir=str(cache_dir) if cache_dir is not None else None)
    except Exception as err:  # e.g. a file that is not UTF-8 text; `datasets` wraps the cause in its own errors
        raise CorpusError(f"data_files: cannot read {files} as UTF-8 text ({_first_line(err)})") from None
    texts = {split: "".join(loaded[split][TEXT_COLUMN]) for split in files}
    about = "files: " + "; ".join(f"{split}={', '.join(Path(p).name for p in paths)}" for split, paths in files.items())
    if "validation" not in texts:
        texts, about = _carve(texts["train"]), about + ", first 90% / last 10%"
    return texts, about


def _from_hub(source: str, cache_dir: str | Path | None) -> tuple[dict[str, str], str]:
    """`name`, `name/config` or `owner/name/config` through `datasets` (`owner/name/` for a dataset without
    configs); the `text` column joined with "", as WikiText's rows keep their newlines."""
    import datasets  # lazy: `import tasks` must not pay for it

    name, config = source.rsplit("/", 1) if "/" in source else (source, None)
    what = f"corpus {source!r} (not a local corpus, so a hub name)"
    try:
        with _offline_from_env(datasets):
            loaded = datasets.load_dataset(name, config or None,
                                           cache_dir=str(cache_dir) if cache_dir is not None else None)
    except Exception as err:  # any failure to get it (offline, unknown name or config, network) is one line
        how = f"use a local corpus ({', '.join(EMBEDDED)}), pass data_files=<text files>, or run on a connected machine"
        raise CorpusError(f"{what} could not be loaded ({_first_line(err)}); {how}") from None
    if "train" not in loaded:
        raise CorpusError(f"{what} has no train split (it has {', '.join(loaded)}); pass data_files=<text files>")
    columns = loaded["train"].column_names
    if TEXT_COLUMN not in columns:
        raise CorpusError(f"{what} has no {TEXT_COLUMN!r} column (it has {', '.join(columns)})")
    texts = {"train": "".join(loaded["train"][TEXT_COLUMN])}
    val = next((s for s in VALIDATION_ALIASES if s in loaded), None)
    if val is None:
        return _carve(texts["train"]), f"hub: {source}, train first 90% / last 10%"
    texts["validation"] = "".join(loaded[val][TEXT_COLUMN])
    return texts, f"hub: {source}, train / {val}"


def _load_texts(source: str, data_files: DataFiles | None, data_dir: str | Path | None,
                cache_dir: str | Path | None = None) -> tuple[dict[str, str], str]:
    """(texts by split, what the rows' `dataset` column says)."""
    if data_files is not None:
        return _from_files(data_files, cache_dir)
    if source in EMBEDDED:
        corpus = EMBEDDED[source]
        root = Path(data_dir).expanduser() if data_dir is not None else data_root()
        train = _read_checked(source, root, corpus.train)
        if corpus.validation is None:
            return _carve(train), corpus.about
        return {"train": train, "validation": _read_checked(source, root, corpus.validation)}, corpus.about
    if not source:
        raise ValueError(f"no corpus named; choose from: {', '.join(EMBEDDED)}, a hub name, or data_files=")
    return _from_hub(source, cache_dir)


def load_texts(source: str = "shakespeare", data_files: DataFiles | None = None, data_dir: str | Path | None = None,
               *, cache_dir: str | Path | None = None) -> dict[str, str]:
    """{"train": text, "validation": text}.

    `data_files` (a path, a list, or {split: path(s)}; validation may be called valid/val/eval/dev/test) wins over
    `source`; with train only, the last 10% of its characters validate. Otherwise `source` is a local corpus of
    `EMBEDDED` (read under `data_dir`, default `data_root()`, checksum verified) or a hub name. `cache_dir` is
    `datasets`' cache (its default when None).
    """
    return _load_texts(source, data_files, data_dir, cache_dir)[0]


# --- tokenizers -------------------------------------------------------------------------------------------


def _ids_list(ids: torch.Tensor | Sequence[int]) -> list[int]:
    return ids.tolist() if isinstance(ids, torch.Tensor) else [int(i) for i in ids]


class Tokenizer(abc.ABC):
    """Text <-> 1-D int64 token ids. `name` is the kind (char, byte, bpe); `vocab_size` bounds the ids."""

    name: str = ""
    vocab_size: int = 0

    @abc.abstractmethod
    def encode(self, text: str) -> torch.Tensor:
        """The ids of `text`, int64, 1-D."""

    @abc.abstractmethod
    def decode(self, ids: torch.Tensor | Sequence[int]) -> str:
        """The text of `ids` (the inverse of `encode` on any text the tokenizer covers)."""

    def digest(self) -> str:
        """What, besides the texts, decides the ids; part of `LMCorpus.fingerprint`."""
        return f"{self.name}:{self.vocab_size}"


class CharTokenizer(Tokenizer):
    """nanoGPT's character level: the ids are the ranks of the characters in sorted order."""

    name = "char"

    def __init__(self, chars: Iterable[str]) -> None:
        self.chars = sorted(set(chars))
        self.vocab_size = len(self.chars)
        # Sorted str order is code point order, so a binary search over code points finds each rank.
        self._points = torch.tensor([ord(c) for c in self.chars], dtype=torch.int64)

    def encode(self, text: str) -> torch.Tensor:
        points = torch.from_numpy(np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64))
        ids = torch.searchsorted(self._points, points).clamp_(max=max(self.vocab_size - 1, 0))
        unknown = self._points[ids] != points if self.vocab_size else torch.ones_like(points, dtype=torch.bool)
        if unknown.any():
            bad = sorted({chr(int(p)) for p in points[unknown][:100]})
            raise ValueError(f"characters not in the vocabulary: {bad!r}; build it from every split's text")
        return ids

    def decode(self, ids: torch.Tensor | Sequence[int]) -> str:
        return "".join(self.chars[i] for i in _ids_list(ids))


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes, vocab 256: no vocabulary to build, and any text encodes."""

    name = "byte"
    vocab_size = 256

    def encode(self, text: str) -> torch.Tensor:
        return torch.from_numpy(np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64))

    def decode(self, ids: torch.Tensor | Sequence[int]) -> str:
        # A model's sample may cut a character; show it as U+FFFD rather than fail.
        return bytes(_ids_list(ids)).decode("utf-8", errors="replace")


class BPETokenizer(Tokenizer):
    """Byte-level BPE (GPT-2's pre-tokenizer and byte alphabet), trained here with the `tokenizers` package."""

    name = "bpe"

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()

    @classmethod
    def train(cls, text: str, vocab_size: int) -> BPETokenizer:
        """Learn merges on `text` (the train split only, so validation stays unseen) up to `vocab_size` tokens,
        the 256 bytes included; a small text may stop short of it."""
        try:
            from tokenizers import Tokenizer as HFTokenizer
            from tokenizers import decoders, models, pre_tokenizers, trainers
        except ImportError:
            message = f"the bpe tokenizer needs the optional package `tokenizers`: {INSTALL_TOKENIZERS}"
            raise CorpusError(message) from None
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        if vocab_size < len(alphabet):
            raise ValueError(f"bpe vocab_size must be >= {len(alphabet)} (the byte alphabet), got {vocab_size}")
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=alphabet, show_progress=False)
        tok.train_from_iterator([text], trainer)  # one piece: pre-tokenized as `encode` will see it
        return cls(tok)

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor(self._tok.encode(text).ids, dtype=torch.int64)

    def decode(self, ids: torch.Tensor | Sequence[int]) -> str:
        return self._tok.decode(_ids_list(ids), skip_special_tokens=False)

    def digest(self) -> str:
        # The merges themselves: a newer `tokenizers` could learn others from the same text.
        return f"{super().digest()}:{hashlib.sha256(self._tok.to_str().encode()).hexdigest()}"


def make_tokenizer(kind: str, texts: dict[str, str], bpe_vocab: int = 1024) -> Tokenizer:
    """`char`: the characters of every split (nanoGPT's prepare.py reads the whole file); `byte`; `bpe`: trained
    on the train split only."""
    if kind == "char":
        return CharTokenizer(set().union(*(set(t) for t in texts.values())))
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        return BPETokenizer.train(texts["train"], bpe_vocab)
    raise ValueError(f"unknown tokenizer {kind!r}; choose from: {', '.join(TOKENIZERS)}")


# --- corpus -----------------------------------------------------------------------------------------------


@dataclass
class LMCorpus:
    """Token ids of both splits (1-D int64), the tokenizer that made them, and what rows record about them.

    `chars`: characters of each split's text; `source`: the rows' `dataset` column; `fingerprint`: sha1 hex of
    the texts and the tokenizer, a cache key for models trained on this corpus. Shared between callers by
    `load_corpus`'s memo: read it, never modify it.
    """

    train: torch.Tensor
    validation: torch.Tensor
    tokenizer: Tokenizer
    chars: dict[str, int]
    source: str
    fingerprint: str

    def tokens_per_char(self, split: str) -> float:
        """Tokens per character of the split: 1 for char, >= 1 for bytes, < 1 for BPE."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose from: {', '.join(SPLITS)}")
        return len(getattr(self, split)) / self.chars[split]


def load_corpus(source: str = "shakespeare", tokenizer: str = "char", data_files: DataFiles | None = None,
                data_dir: str | Path | None = None, bpe_vocab: int = 1024) -> LMCorpus:
    """The texts of `load_texts`, tokenized. The last result is kept: every method of a sweep reads the same
    corpus, and reading, checking and tokenizing it is the slow part of a small model's set-up."""
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer {tokenizer!r}; choose from: {', '.join(TOKENIZERS)}")
    files = None if data_files is None else tuple((s, tuple(p)) for s, p in _as_files(data_files).items())
    root = None
    if data_files is None and source in EMBEDDED:  # resolved here, so a changed $ATTNBENCH_DATA is a new key
        root = str(Path(data_dir).expanduser() if data_dir is not None else data_root())
    return _load_corpus(source, tokenizer, files, root, bpe_vocab if tokenizer == "bpe" else 0)


@functools.lru_cache(maxsize=1)
def _load_corpus(source: str, kind: str, files: tuple[tuple[str, tuple[str, ...]], ...] | None, root: str | None,
                 bpe_vocab: int) -> LMCorpus:
    """load_corpus on hashable arguments (data_files as ((split, paths), ...)), memoised."""
    texts, about = _load_texts(source, None if files is None else {s: list(p) for s, p in files}, root)
    tok = make_tokenizer(kind, texts, bpe_vocab)
    sums = [hashlib.sha256(texts[s].encode("utf-8")).hexdigest() for s in SPLITS]
    return LMCorpus(
        train=tok.encode(texts["train"]),
        validation=tok.encode(texts["validation"]),
        tokenizer=tok,
        chars={s: len(texts[s]) for s in SPLITS},
        source=about,
        fingerprint=hashlib.sha1("|".join([*sums, tok.digest()]).encode()).hexdigest(),
    )


# --- training and evaluation views ------------------------------------------------------------------------


def bits_per_char(loss_nats: float, tokens_per_char: float) -> float:
    """Mean loss per token in nats -> bits per character: the unit that makes char, byte and BPE models
    comparable (a token's loss spread over the characters it covers)."""
    return loss_nats / math.log(2) * tokens_per_char


def windows(ids: torch.Tensor, context: int, stride: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y), each (n, context): x[i] = ids[i*stride : i*stride + context], y[i] the same shifted by one.

    Zero-copy strided views, so a million training windows cost no memory. stride=1 gives every training
    window (nanoGPT samples random offsets; a permutation of all of them is the same distribution without
    replacement); stride=context gives non-overlapping evaluation windows that score every token of the split
    once, except the first (and a tail shorter than a window). n = (len(ids) - context - 1) // stride + 1.
    """
    if ids.dim() != 1:
        raise ValueError(f"ids must be 1-D, got shape {tuple(ids.shape)}")
    if context < 1 or stride < 1:
        raise ValueError(f"context and stride must be >= 1, got context={context}, stride={stride}")
    if len(ids) < context + 1:
        raise ValueError(f"{len(ids)} tokens are too few for one window of context {context} (need {context + 1})")
    n = (len(ids) - context - 1) // stride + 1
    step, offset = ids.stride(0), ids.storage_offset()
    x = ids.as_strided((n, context), (stride * step, step), offset)
    y = ids.as_strided((n, context), (stride * step, step), offset + step)
    return x, y
