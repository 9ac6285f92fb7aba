"""Document lengths of packed batches and their masks (tasks/doc_lengths.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tasks.doc_lengths import (
    cu_seqlens,
    document_ids,
    document_mask,
    in_document_pairs,
    pack_lengths,
    read_lengths_csv,
    wikitext2_article_lengths,
)


@pytest.mark.parametrize("kind", ["equal", "uniform", "lognormal"])
def test_packs_fill_the_sequence_exactly_and_repeat_with_the_seed(kind: str) -> None:
    lengths = pack_lengths(kind, total=4099, mean=300, seed=3)
    assert sum(lengths) == 4099 and min(lengths) >= 1
    assert pack_lengths(kind, total=4099, mean=300, seed=3) == lengths
    many = pack_lengths(kind, total=300_000, mean=300, seed=1)[:-1]  # the last one is cut to fit
    assert abs(np.mean(many) - 300) < 300 * 0.08, np.mean(many)
    if kind == "equal":
        assert set(lengths[:-1]) == {300} and lengths[-1] == 4099 - 13 * 300
    else:
        assert len(set(many)) > 50 and pack_lengths(kind, total=4099, mean=300, seed=4) != lengths


def test_a_csv_of_lengths_is_the_distribution(tmp_path) -> None:
    path = tmp_path / "lengths.csv"
    path.write_text("doc,length\na,17\nb,1000\nc,1\n")
    assert read_lengths_csv(path) == [17, 1000, 1]
    lengths = pack_lengths(str(path), total=20_000, mean=1, seed=0)
    assert sum(lengths) == 20_000 and set(lengths[:-1]) <= {1, 17, 1000}
    bare = tmp_path / "bare.csv"
    bare.write_text("5\n7\n")
    assert read_lengths_csv(bare) == [5, 7]


@pytest.mark.parametrize(("text", "message"), [("doc,size\na,3\n", "no column named length"),
                                               ("length\n0\n", "every length >= 1"),
                                               ("length\nmany\n", "not a number")])  # fmt: skip
def test_a_bad_lengths_file_says_what_is_wrong(tmp_path, text: str, message: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        read_lengths_csv(path)
    with pytest.raises(FileNotFoundError, match="equal, uniform, lognormal, wikitext2 or a CSV path"):
        pack_lengths(str(tmp_path / "missing.csv"), total=10, mean=1)


@pytest.mark.shared_data
def test_wikitext2_articles_are_whole_articles() -> None:
    lengths = wikitext2_article_lengths()
    # valid.txt and test.txt: 60 articles each, as WikiText-2 was published
    assert len(lengths) == 120 and min(lengths) > 2_000  # a formula line taken for a title would cut one short
    assert 5_000 < float(np.median(lengths)) < 50_000
    packed = pack_lengths("wikitext2", total=65_536, mean=1, seed=0)
    assert sum(packed) == 65_536 and set(packed[:-1]) <= set(lengths)


def test_masks_keep_documents_apart() -> None:
    lengths = [1, 17, 300, 1000]
    cu = cu_seqlens(lengths)
    assert cu.tolist() == [0, 1, 18, 318, 1318] and cu.dtype == torch.int32
    docs = document_ids(cu)
    assert docs.tolist()[:19] == [0] + [1] * 17 + [2]
    for causal in (False, True):
        mask = document_mask(cu, causal)
        # the oracle: a block-diagonal matrix, lower-triangular within each block when causal
        expected = torch.block_diag(*[torch.ones(n, n, dtype=torch.bool) for n in lengths])
        if causal:
            expected &= torch.ones(1318, 1318, dtype=torch.bool).tril()
        assert torch.equal(mask, expected)
        assert int(mask.sum()) == in_document_pairs(lengths, causal)


def test_bad_lengths_are_refused() -> None:
    with pytest.raises(ValueError, match=">= 1"):
        cu_seqlens([3, 0])
    with pytest.raises(ValueError, match=">= 1"):
        pack_lengths("equal", total=0, mean=4)
