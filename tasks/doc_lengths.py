"""How the documents of a packed batch are drawn, and the masks that keep them apart.

Why: training packs documents end to end into one sequence, and attention must not cross a document
boundary. How long the documents are decides what a varlen kernel saves over a padded batch, so lengths
are drawn from a named distribution - `equal`, `uniform`, `lognormal`, the article lengths of WikiText-2
(bytes, the byte vocabulary's tokens) - or from any CSV of lengths (LongCA-bench publishes the Pile's and
ProLong's). A packed sequence is described as FlashAttention describes it: `cu_seqlens`, the documents'
start offsets followed by the total.

Groundwork for issue 16 (packed variable-length batches): the sweep key, the kernels and the report build
on these functions.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import numpy as np
import torch

NAMED = ("equal", "uniform", "lognormal", "wikitext2")
LOGNORMAL_SIGMA = 1.0  # spread of log length: a long tail of long documents, as in real corpora
# WikiText's top-level heading, one per article, between blank lines (" "): a formula line inside an article
# can look like a heading, but is never set off by blank lines on both sides.
_ARTICLE_TITLE = re.compile(r"^ \n = [^=\n][^\n]* = \n \n", re.MULTILINE)


@cache
def wikitext2_article_lengths(data_dir: str | None = None) -> tuple[int, ...]:
    """Bytes (UTF-8) of each article of WikiText-2's validation and test files, checksums verified."""
    from tasks.lm_data import load_texts

    lengths = []
    for text in load_texts("wikitext2", data_dir=data_dir).values():
        starts = [m.start() for m in _ARTICLE_TITLE.finditer(text)]
        for begin, end in zip(starts, [*starts[1:], len(text)], strict=True):
            lengths.append(len(text[begin:end].encode("utf-8")))
    return tuple(lengths)


def read_lengths_csv(path: str | Path) -> list[int]:
    """Document lengths from a CSV: the column named `length` (or `len`, `tokens`), else the only column."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"lengths file {path} not found; lengths= takes {', '.join(NAMED)} or a CSV path")
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        raise ValueError(f"lengths file {path} is empty")
    header = [h.strip().lower() for h in rows[0]]
    named = next((header.index(k) for k in ("length", "len", "tokens") if k in header), None)
    if named is None and len(header) != 1:
        raise ValueError(f"lengths file {path}: no column named length, len or tokens among {rows[0]}")
    column, body = (named, rows[1:]) if named is not None else (0, rows[1:] if not header[0].isdigit() else rows)
    try:
        lengths = [int(float(r[column])) for r in body if r and r[column].strip()]
    except ValueError as err:
        raise ValueError(f"lengths file {path}: not a number: {err}") from err
    if not lengths or min(lengths) < 1:
        raise ValueError(f"lengths file {path}: needs at least one length, every length >= 1")
    return lengths


def pack_lengths(kind: str, total: int, mean: int, seed: int = 0) -> list[int]:
    """Document lengths drawn from `kind` until they fill `total` tokens (the last one cut to fit).

    `mean` is the mean document length of `equal`, `uniform` (1 .. 2*mean-1) and `lognormal`; the empirical
    distributions (`wikitext2`, a CSV path) bring their own. The same seed gives the same documents.
    """
    if total < 1 or mean < 1:
        raise ValueError(f"total and mean must be >= 1 (got total={total}, mean={mean})")
    rng = np.random.default_rng(seed)
    if kind == "equal":
        draw = lambda n: np.full(n, mean)  # noqa: E731
    elif kind == "uniform":
        draw = lambda n: rng.integers(1, 2 * mean, size=n)  # noqa: E731
    elif kind == "lognormal":
        mu = np.log(mean) - LOGNORMAL_SIGMA**2 / 2  # so that the mean, not the median, is `mean`
        draw = lambda n: np.maximum(1, np.rint(rng.lognormal(mu, LOGNORMAL_SIGMA, size=n))).astype(np.int64)  # noqa: E731
    else:
        pool = np.asarray(wikitext2_article_lengths() if kind == "wikitext2" else read_lengths_csv(kind))
        draw = lambda n: rng.choice(pool, size=n)  # noqa: E731
    lengths: list[int] = []
    filled = 0
    while filled < total:
        for n in draw(max(8, 2 * (total - filled) // mean + 1)).tolist():
            n = min(int(n), total - filled)
            lengths.append(n)
            filled += n
            if filled == total:
                break
    return lengths


def cu_seqlens(lengths: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """int32 offsets [0, l0, l0+l1, ..., total]: FlashAttention's varlen description of a packed sequence."""
    if not lengths or min(lengths) < 1:
        raise ValueError(f"document lengths must be a non-empty list of lengths >= 1, got {list(lengths)[:8]}")
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return torch.tensor(offsets, dtype=torch.int32, device=device)


def document_ids(cu: torch.Tensor) -> torch.Tensor:
    """The document index of each token of the packed sequence."""
    counts = (cu[1:] - cu[:-1]).long()
    return torch.repeat_interleave(torch.arange(len(counts), device=cu.device), counts)


def document_mask_mod(cu: torch.Tensor, causal: bool):
    """`mask_mod(b, h, q, kv)` in attention-gym's form: True where query q may see key kv (same document)."""
    docs = document_ids(cu)

    def mask_mod(b, h, q_idx, kv_idx):
        same = docs[q_idx] == docs[kv_idx]
        return same & (q_idx >= kv_idx) if causal else same

    return mask_mod


def document_mask(cu: torch.Tensor, causal: bool) -> torch.Tensor:
    """The dense (N, N) boolean mask of `document_mask_mod`: what the oracle and the tests compare against."""
    n = int(cu[-1])
    q = torch.arange(n, device=cu.device)[:, None]
    kv = torch.arange(n, device=cu.device)[None, :]
    return document_mask_mod(cu, causal)(0, 0, q, kv)


def in_document_pairs(lengths: Sequence[int], causal: bool) -> int:
    """Query-key pairs inside documents: what a varlen kernel computes (its FLOPs are 4*D per pair)."""
    return sum(n * (n + 1) // 2 if causal else n * n for n in lengths)
