"""The perplexity task's data layer on the real shared corpora (read in place from `data_root()`, checksums
verified), nanoGPT's Shakespeare split, the char / byte / BPE tokenizers, bits per character, the strided
windows, and one-line CorpusErrors for what cannot be had (altered or missing files, the hub offline, a missing
`tokenizers` package)."""

from __future__ import annotations

import importlib.util
import math
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tasks import lm_data
from tasks.lm_data import (
    DATA_ENV,
    EMBEDDED,
    ByteTokenizer,
    CharTokenizer,
    CorpusError,
    bits_per_char,
    data_root,
    load_corpus,
    load_texts,
    make_tokenizer,
    windows,
)

HAS_TOKENIZERS = importlib.util.find_spec("tokenizers") is not None


def shared_text(rel: str) -> str:
    """A shared file read the way nanoGPT's prepare.py reads it: text mode, whole file."""
    with open(data_root() / rel, encoding="utf-8") as f:
        return f.read()


@pytest.fixture(autouse=True)
def default_data_root(monkeypatch):
    """Tests read the shared folder next to the repository, whatever the caller's environment says."""
    monkeypatch.delenv(DATA_ENV, raising=False)


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and message
    return message


# --- local corpora ----------------------------------------------------------------------------------------


def test_data_root_defaults_to_the_shared_folder_and_follows_the_env(monkeypatch, tmp_path):
    repo = Path(lm_data.__file__).resolve().parent.parent
    assert data_root() == repo.parent / "shared" / "data"
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    assert data_root() == tmp_path


@pytest.mark.shared_data
def test_shakespeare_is_nanogpts_split_with_65_characters():
    text = shared_text(EMBEDDED["shakespeare"].train.path)
    cut = int(len(text) * 0.9)  # prepare.py: train_data = data[:int(n*0.9)]
    texts = load_texts("shakespeare")
    assert texts == {"train": text[:cut], "validation": text[cut:]}
    # The numbers nanoGPT's data/shakespeare_char/prepare.py prints for this file.
    assert (len(texts["train"]), len(texts["validation"])) == (1_003_854, 111_540)
    corpus = load_corpus("shakespeare", "char")
    assert corpus.tokenizer.vocab_size == len(set(text)) == 65
    assert corpus.train.dtype == corpus.validation.dtype == torch.int64
    assert corpus.chars == {"train": cut, "validation": len(text) - cut}
    assert corpus.tokens_per_char("train") == corpus.tokens_per_char("validation") == 1.0
    assert corpus.tokenizer.decode(corpus.validation) == text[cut:]
    assert "shakespeare" in corpus.source and "90%" in corpus.source
    assert load_corpus("shakespeare", "char") is corpus  # memoised: every method of a sweep reads this one


@pytest.mark.shared_data
def test_wikitext2_trains_on_valid_and_validates_on_test():
    files = EMBEDDED["wikitext2"]
    assert files.validation is not None
    texts = load_texts("wikitext2")
    assert texts == {"train": shared_text(files.train.path), "validation": shared_text(files.validation.path)}
    byte = load_corpus("wikitext2", "byte")
    assert all(len(byte_ids) == len(texts[s].encode("utf-8")) for s, byte_ids in
               (("train", byte.train), ("validation", byte.validation)))
    assert byte.tokens_per_char("train") > 1.0 and byte.tokens_per_char("validation") > 1.0  # £, é, —, ...
    char = load_corpus("wikitext2", "char")
    assert char.tokens_per_char("validation") == 1.0
    assert char.tokenizer.vocab_size == len(set(texts["train"]) | set(texts["validation"]))
    assert "valid.txt" in char.source and "test.txt" in char.source
    assert char.fingerprint != byte.fingerprint and len(char.fingerprint) == 40


def copy_corpus(tmp_path: Path, name: str) -> Path:
    corpus = EMBEDDED[name]
    for file in (corpus.train, corpus.validation):
        if file is not None:
            (tmp_path / file.path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(data_root() / file.path, tmp_path / file.path)
    return tmp_path


@pytest.mark.shared_data
def test_a_copy_with_one_byte_changed_fails_its_checksum(tmp_path):
    root = copy_corpus(tmp_path, "wikitext2")
    assert load_texts("wikitext2", data_dir=root) == load_texts("wikitext2")  # an exact copy passes
    target = root / EMBEDDED["wikitext2"].validation.path
    raw = bytearray(target.read_bytes())
    raw[1000] ^= 0x01
    target.write_bytes(bytes(raw))
    with pytest.raises(CorpusError) as excinfo:
        load_texts("wikitext2", data_dir=root)
    message = one_line_error(excinfo)
    assert str(target) in message and EMBEDDED["wikitext2"].validation.sha256[:12] in message


def test_a_missing_folder_says_how_to_point_elsewhere(tmp_path, monkeypatch):
    with pytest.raises(CorpusError) as excinfo:
        load_texts("shakespeare", data_dir=tmp_path / "nowhere")
    message = one_line_error(excinfo)
    assert DATA_ENV in message and "task.data_dir" in message and str(tmp_path / "nowhere") in message
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "elsewhere"))
    with pytest.raises(CorpusError, match="elsewhere"):
        load_corpus("shakespeare")


# --- tokenizers -------------------------------------------------------------------------------------------


@pytest.mark.shared_data
@pytest.mark.parametrize("source", ["shakespeare", "wikitext2"])
def test_char_and_byte_round_trip(source):
    texts = load_texts(source)
    sample = texts["validation"][:20_000]
    char = make_tokenizer("char", texts)
    ids = char.encode(sample)
    assert ids.dtype == torch.int64 and ids.dim() == 1 and len(ids) == len(sample)
    assert int(ids.max()) < char.vocab_size and char.decode(ids) == sample
    byte = make_tokenizer("byte", texts)
    ids = byte.encode(sample)
    assert byte.vocab_size == 256 and int(ids.max()) < 256 and ids.dtype == torch.int64
    assert byte.decode(ids) == sample and byte.decode(ids.tolist()) == sample


def test_char_vocabulary_is_sorted_and_rejects_unseen_characters():
    tok = CharTokenizer("hello world")
    assert tok.chars == sorted(set("hello world")) and tok.encode("dew").tolist() == [tok.chars.index(c) for c in "dew"]
    with pytest.raises(ValueError, match="z"):
        tok.encode("zoo")
    assert ByteTokenizer().decode(torch.tensor([0xE2, 0x80])) == "\ufffd"  # a cut character, shown not raised


@pytest.mark.shared_data
def test_unknown_tokenizer_lists_the_choices():
    with pytest.raises(ValueError, match="char, byte, bpe"):
        make_tokenizer("word", {"train": "a", "validation": "b"})
    with pytest.raises(ValueError, match="char, byte, bpe"):
        load_corpus("shakespeare", "word")


@pytest.mark.shared_data
@pytest.mark.skipif(not HAS_TOKENIZERS, reason="the optional package `tokenizers` is not installed")
def test_bpe_trained_on_shakespeare_round_trips_with_fewer_tokens_than_characters():
    texts = load_texts("shakespeare")
    tok = make_tokenizer("bpe", {"train": texts["train"][:200_000], "validation": ""}, bpe_vocab=300)
    assert 256 < tok.vocab_size <= 300
    sample = texts["validation"][:20_000]
    ids = tok.encode(sample)
    assert ids.dtype == torch.int64 and int(ids.max()) < tok.vocab_size
    assert tok.decode(ids) == sample
    assert len(ids) / len(sample) < 1.0


def test_bpe_without_tokenizers_is_a_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # what `import tokenizers` sees when it is not installed
    with pytest.raises(CorpusError) as excinfo:
        make_tokenizer("bpe", {"train": "some text", "validation": "more"})
    assert "tokenizers" in one_line_error(excinfo)


# --- bits per character and windows -----------------------------------------------------------------------


@pytest.mark.shared_data
def test_a_uniform_model_scores_log2_of_the_vocabulary_in_bits_per_char():
    corpus = load_corpus("shakespeare", "char")
    targets = corpus.validation[:4096]
    vocab = corpus.tokenizer.vocab_size
    loss = F.cross_entropy(torch.zeros(len(targets), vocab), targets).item()  # uniform over the vocabulary
    assert bits_per_char(loss, corpus.tokens_per_char("validation")) == pytest.approx(math.log2(vocab))
    # A byte-level uniform model pays 8 bits per byte, so more per character where characters take several bytes.
    assert bits_per_char(math.log(256), 1.25) == pytest.approx(8 * 1.25)


def test_training_windows_are_every_offset_shifted_by_one_without_copies():
    ids = torch.arange(100, dtype=torch.int64) * 3
    x, y = windows(ids, context=8)
    assert x.shape == y.shape == (100 - 8, 8)
    assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y[:, -1], ids[8:])
    assert all(torch.equal(x[i], ids[i:i + 8]) for i in range(len(x)))
    assert x.untyped_storage().data_ptr() == y.untyped_storage().data_ptr() == ids.untyped_storage().data_ptr()
    for stride in (1, 3, 7, 8):
        x, _ = windows(ids, 8, stride)
        assert len(x) == (100 - 8 - 1) // stride + 1 and torch.equal(x[-1], ids[(len(x) - 1) * stride:][:8])


@pytest.mark.shared_data
def test_evaluation_windows_score_each_token_once_from_the_second():
    corpus = load_corpus("shakespeare", "char")
    ids, context = corpus.validation, 256
    x, y = windows(ids, context, stride=context)
    n = len(x)
    assert n == (len(ids) - context - 1) // context + 1
    assert torch.equal(x.reshape(-1), ids[: n * context]) and torch.equal(y.reshape(-1), ids[1 : n * context + 1])
    offset = ids[10:]  # a view that does not start at its storage's start
    x, y = windows(offset, 4, 4)
    assert torch.equal(y[0], ids[11:15])


def test_windows_need_one_more_token_than_the_context():
    assert windows(torch.arange(9), 8)[0].shape == (1, 8)
    with pytest.raises(ValueError, match="too few"):
        windows(torch.arange(8), 8)
    with pytest.raises(ValueError, match="1-D"):
        windows(torch.zeros(2, 20, dtype=torch.int64), 4)


# --- files and hub through `datasets` ---------------------------------------------------------------------


def test_text_files_through_datasets_carve_validation_from_train(tmp_path):
    text = "".join(f"line {i}: café — naïve\n" for i in range(300))
    (tmp_path / "train.txt").write_text(text, encoding="utf-8")
    (tmp_path / "held.txt").write_text("held out text\nsecond line\n", encoding="utf-8")
    cut = int(len(text) * 0.9)
    texts = load_texts(data_files=str(tmp_path / "train.txt"), cache_dir=tmp_path / "cache")
    assert texts == {"train": text[:cut], "validation": text[cut:]}
    both = {"train": [str(tmp_path / "train.txt")], "test": str(tmp_path / "held.txt")}
    texts = load_texts(data_files=both, cache_dir=tmp_path / "cache")
    assert texts == {"train": text, "validation": "held out text\nsecond line\n"}
    with pytest.raises(CorpusError) as excinfo:
        load_texts(data_files=str(tmp_path / "absent.txt"))
    assert "absent.txt" in one_line_error(excinfo)
    with pytest.raises(ValueError, match="train, validation"):
        load_texts(data_files={"training": str(tmp_path / "train.txt")})


def test_a_hub_name_offline_fails_fast_in_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(CorpusError) as excinfo:
        load_texts("attnbench-no-such-corpus/raw-v1", cache_dir=tmp_path / "cache")
    assert time.perf_counter() - start < 5.0
    message = one_line_error(excinfo)
    assert "attnbench-no-such-corpus/raw-v1" in message and "shakespeare, wikitext2" in message
