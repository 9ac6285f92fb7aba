"""ListOps data: the evaluator on hand-written trees, generated labels against the evaluator, length
bounds, determinism, split uniqueness, the vocabulary round trip, LRA's tokenisation, and argument checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tasks.listops_data import (
    CLOSE,
    PAD_ID,
    VOCAB,
    VOCAB_SIZE,
    decode,
    encode,
    evaluate,
    majority_rate,
    make_listops,
    make_listops_splits,
    max_tree_length,
    tokenize,
)

SMOKE = dict(max_depth=3, max_args=10, min_len=20, max_len=64)


# --- evaluator ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, value",
    [
        ("7", 7),
        ("[MED 0 9 ]", 4),  # even count: mean of the middle two, rounded down (LRA's int(np.median))
        ("[MED 1 2 ]", 1),
        ("[MED 3 1 2 ]", 2),
        ("[MED 9 0 8 1 ]", 4),  # sorted 0 1 8 9: (1 + 8) // 2
        ("[SM 9 9 9 ]", 7),
        ("[SM 5 5 ]", 0),
        ("[MIN 4 7 ]", 4),
        ("[MAX 2 9 0 ]", 9),
        ("[MAX 2 9 [MIN 4 7 ] 0 ]", 9),
        ("[MIN 5 [MAX 1 3 ] 8 ]", 3),
        ("[SM 1 [MED 2 4 6 ] [MAX 0 [MIN 9 8 ] ] ]", 3),  # 1 + 4 + 8 = 13
        ("[MED [SM 9 9 ] [MIN 3 5 ] [MAX 0 1 ] 7 ]", 5),  # 8 3 1 7: (3 + 7) // 2
        ("( ( ( [MAX 2 ) 9 ) ] )", 9),  # LRA's TSV form: parentheses are ignored
    ],
)
def test_evaluate_hand_written_trees(text, value):
    assert evaluate(text) == value
    assert evaluate(tokenize(text)) == value


@pytest.mark.parametrize(
    "text, match",
    [
        ("", "empty"),
        ("[MAX 1 2", "unclosed"),
        ("[MAX 1 2 ] ]", "follows a complete tree"),
        ("]", "unmatched"),
        ("[MIN ]", "no arguments"),
        ("[FOO 1 ]", "unknown"),
        ("1 2", "follows a complete tree"),
    ],
)
def test_evaluate_rejects_malformed_trees(text, match):
    with pytest.raises(ValueError, match=match):
        evaluate(text)


# --- generator ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smoke_data():
    return make_listops(400, seed=0, **SMOKE)


def test_every_label_equals_the_evaluator(smoke_data):
    assert len(smoke_data) == 400
    for text, label, row, length in zip(smoke_data.texts, smoke_data.labels.tolist(), smoke_data.inputs,
                                        smoke_data.lengths.tolist(), strict=True):
        assert evaluate(text) == label
        assert evaluate(decode(row)) == label  # the encoded input carries the whole tree
        assert decode(row) == text.split() and len(text.split()) == length


def test_lengths_shapes_and_padding(smoke_data):
    d = smoke_data
    assert d.inputs.shape == (400, 64) and d.inputs.dtype == torch.int64
    assert d.labels.shape == (400,) and d.labels.dtype == torch.int64
    assert ((d.lengths >= 20) & (d.lengths <= 64)).all()
    assert (d.inputs.ne(PAD_ID).sum(1) == d.lengths).all()
    positions = torch.arange(64)
    assert (d.inputs[positions >= d.lengths[:, None]] == PAD_ID).all()  # right-padded


def test_labels_cover_several_classes_and_trees_are_unique(smoke_data):
    counts = torch.bincount(smoke_data.labels, minlength=10)
    assert (counts > 0).sum() >= 6
    assert majority_rate(smoke_data.labels) == counts.max().item() / 400 < 0.5
    assert len(set(smoke_data.texts)) == 400


def test_trees_follow_the_settings():
    """Depth and arity stay within max_depth and max_args (root at depth 1, digits may sit at max_depth)."""
    d = make_listops(200, seed=3, max_depth=4, max_args=3, min_len=10, max_len=80)
    for text in d.texts:
        depth, deepest, arity = 0, 0, []
        for tok in text.split():
            if tok.startswith("["):
                if arity:
                    arity[-1] += 1
                arity.append(0)
                depth += 1
            elif tok == CLOSE:
                assert 2 <= arity.pop() <= 3
                depth -= 1
            else:
                arity[-1] += 1
                deepest = max(deepest, depth + 1)
        assert deepest <= 4


def test_seeded_determinism():
    a = make_listops(50, seed=7, **SMOKE)
    b = make_listops(50, seed=7, **SMOKE)
    c = make_listops(50, seed=8, **SMOKE)
    assert a.texts == b.texts and torch.equal(a.inputs, b.inputs) and torch.equal(a.labels, b.labels)
    assert a.texts != c.texts


def test_splits_are_disjoint_and_test_split_is_stable():
    small = dict(max_depth=3, max_args=4, min_len=8, max_len=24)  # few distinct trees: collisions happen
    s = make_listops_splits(300, 100, 100, seed=1, **small)
    assert [len(s[k]) for k in ("train", "val", "test")] == [300, 100, 100]
    sets = {k: set(v.texts) for k, v in s.items()}
    assert all(len(sets[k]) == len(s[k].texts) for k in sets)
    assert not sets["train"] & sets["val"] and not sets["train"] & sets["test"] and not sets["val"] & sets["test"]
    assert s["test"].texts == make_listops_splits(50, 100, 100, seed=1, **small)["test"].texts
    assert make_listops_splits(300, 100, 100, seed=1, **small)["train"].texts == s["train"].texts


def test_exclude_is_respected():
    small = dict(max_depth=3, max_args=3, min_len=4, max_len=12)
    first = make_listops(100, seed=0, **small)
    second = make_listops(100, seed=0, exclude=set(first.texts), **small)
    assert not set(first.texts) & set(second.texts)
    for d in (first, second):  # a tight max_len: the closing brackets must count too
        assert ((d.lengths >= 4) & (d.lengths <= 12)).all()


def test_lra_setting_small_sample():
    d = make_listops(10, seed=0)  # max_depth 10, max_args 10, lengths 500-2000
    assert d.inputs.shape == (10, 2000)
    assert ((d.lengths >= 500) & (d.lengths <= 2000)).all()
    assert all(evaluate(t) == v for t, v in zip(d.texts, d.labels.tolist(), strict=True))


def test_generator_med_matches_numpy_median_on_even_counts():
    """The generator's MED is LRA's int(np.median): check it where even counts make it matter."""
    d = make_listops(300, seed=5, max_depth=2, max_args=4, min_len=4, max_len=6, max_attempts=100_000)
    for text, label in zip(d.texts, d.labels.tolist(), strict=True):
        toks = text.split()
        if toks[0] == "[MED":
            assert label == int(np.median([int(t) for t in toks[1:-1]]))


# --- tokenisation and vocabulary ----------------------------------------------------------------


def test_tokenize_strips_parentheses_and_optionally_the_close():
    lra_tsv = "( ( ( [MAX 2 ) ( ( ( [MIN 4 ) 7 ) ] ) ) ] )"
    assert tokenize(lra_tsv) == ["[MAX", "2", "[MIN", "4", "7", "]", "]"]
    assert tokenize(lra_tsv, keep_close=False) == ["[MAX", "2", "[MIN", "4", "7"]
    d = make_listops(20, seed=0, keep_close=False, **SMOKE)
    assert not (d.inputs == VOCAB.index(CLOSE)).any()
    assert (d.lengths == torch.tensor([len(t.split()) - t.split().count(CLOSE) for t in d.texts])).all()


def test_encode_decode_round_trip():
    tokens = tokenize("[SM 1 [MED 2 4 6 ] [MAX 0 [MIN 9 8 ] ] ]")
    ids = encode(tokens)
    assert ids.dtype == torch.int64 and ids.shape == (len(tokens),) and (ids != PAD_ID).all()
    assert decode(ids) == tokens
    padded = encode(tokens, length=32)
    assert padded.shape == (32,) and (padded[len(tokens):] == PAD_ID).all()
    assert decode(padded) == tokens
    assert decode(torch.arange(1, VOCAB_SIZE)) == list(VOCAB[1:])


def test_encode_decode_reject_bad_input():
    with pytest.raises(ValueError, match="unknown ListOps token"):
        encode(["[MAX", "x"])
    with pytest.raises(ValueError, match="length=2"):
        encode(["[MAX", "1", "2", "]"], length=2)
    with pytest.raises(ValueError, match="ids must be"):
        decode([VOCAB_SIZE])


# --- arguments ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, name",
    [
        (dict(min_len=70, max_len=64), "min_len"),
        (dict(max_args=1), "max_args"),
        (dict(max_depth=1), "max_depth"),
        (dict(min_len=0), "min_len"),
        (dict(n=-1), "n"),
        (dict(seed=-1), "seed"),
        (dict(max_depth=2, max_args=2, min_len=5, max_len=9), "min_len"),  # longest possible tree is 4
    ],
)
def test_bad_arguments_raise_one_line_value_error(kw, name):
    args = dict(n=10, seed=0, **SMOKE) | kw
    with pytest.raises(ValueError) as info:
        make_listops(**args)
    message = str(info.value)
    assert "\n" not in message and name in message


def test_bad_split_size_and_impossible_request():
    with pytest.raises(ValueError, match="n_val"):
        make_listops_splits(10, -1, 10, seed=0, **SMOKE)
    # only 10 distinct trees of length 1 exist: asking for 11 runs out of attempts instead of looping
    with pytest.raises(ValueError, match="max_attempts"):
        make_listops(11, seed=0, max_depth=2, max_args=2, min_len=1, max_len=1, max_attempts=5_000)


def test_max_tree_length():
    assert max_tree_length(2, 2) == 4  # [OP d d ]
    assert max_tree_length(3, 2) == 10


def test_majority_rate():
    assert majority_rate([1, 1, 2, 3]) == 0.5
    assert majority_rate(torch.tensor([4])) == 1.0
    with pytest.raises(ValueError):
        majority_rate([])
