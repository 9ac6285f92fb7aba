"""The oracle itself against a per-query loop written independently of it."""

import math

import pytest
import torch

from methods import build
from methods.base import causal_visible_keys, computed_pairs_dense
from methods.oracle import fidelity, oracle_attention


def loop_attention(q, k, v, causal):
    """One query at a time, in Python floats' precision (fp64), bottom-right causal, empty rows zero."""
    b, h, n_q, d = q.shape
    n_k = k.shape[-2]
    out = torch.zeros(b, h, n_q, v.shape[-1], dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            for i in range(n_q):
                visible = min(n_k, i + n_k - n_q + 1) if causal else n_k
                if visible <= 0:
                    continue
                s = (k[bi, hi, :visible].double() @ q[bi, hi, i].double()) / math.sqrt(d)
                out[bi, hi, i] = torch.softmax(s, 0) @ v[bi, hi, :visible].double()
    return out


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n_q,n_k", [(1, 1), (5, 5), (17, 17), (3, 11), (11, 3), (1, 9)])
def test_oracle_matches_loop(causal, n_q, n_k):
    q, k, v = torch.randn(2, 2, n_q, 8), torch.randn(2, 2, n_k, 8), torch.randn(2, 2, n_k, 8)
    expected = loop_attention(q, k, v, causal)
    for block_q in (1, 4, 1024):  # query blocking must not change the answer
        got = oracle_attention(q, k, v, causal=causal, block_q=block_q)
        assert torch.allclose(got, expected, atol=1e-12)


def test_oracle_mask_mod_and_empty_rows():
    q, k, v = torch.randn(1, 1, 6, 4), torch.randn(1, 1, 6, 4), torch.randn(1, 1, 6, 4)
    # A window of 2 keys: query i sees keys i-1 and i.
    got = oracle_attention(q, k, v, mask_mod=lambda b, h, qi, ki: (ki <= qi) & (qi - ki < 2))
    for i in range(6):
        lo = max(0, i - 1)
        s = (k[0, 0, lo : i + 1].double() @ q[0, 0, i].double()) / 2.0
        assert torch.allclose(got[0, 0, i], torch.softmax(s, 0) @ v[0, 0, lo : i + 1].double())
    nothing = oracle_attention(q, k, v, mask_mod=lambda b, h, qi, ki: ki < 0)
    assert torch.equal(nothing, torch.zeros_like(nothing))


def test_causal_visible_keys_and_pairs():
    assert causal_visible_keys(4, 4).tolist() == [1, 2, 3, 4]
    assert causal_visible_keys(2, 5).tolist() == [4, 5]  # queries are the last two tokens
    assert causal_visible_keys(5, 2).tolist() == [0, 0, 0, 1, 2]  # early queries see nothing
    assert computed_pairs_dense(1000, 1000, True) == 1000 * 1001 // 2
    assert computed_pairs_dense(1000, 1000, False) == 1000 * 1000
    assert computed_pairs_dense(3, 10, True) == 8 + 9 + 10
    assert computed_pairs_dense(10, 3, True) == 1 + 2 + 3


def test_fidelity_metrics():
    ref = torch.tensor([[3.0, 4.0]], dtype=torch.float64)
    max_abs, rel = fidelity(torch.tensor([[3.0, 4.5]]), ref)
    assert max_abs == pytest.approx(0.5)
    assert rel == pytest.approx(0.5 / 5.0)


@pytest.mark.parametrize(
    "attention",
    [
        lambda q, k, v: oracle_attention(q, k, v, causal=True),
        lambda q, k, v: build("memory_efficient", query_chunk=4, key_chunk=3)(q, k, v, causal=True),
        lambda q, k, v: build("topk", top_k=2)(q, k, v, causal=True),
    ],
    ids=["oracle", "memory_efficient", "topk"],
)
def test_rows_that_see_no_key_have_zero_gradients_not_nan(attention):
    """Causal with more queries than keys: the first n_q - n_k queries see nothing (output 0). Their softmax
    denominator is 0; dividing by fp32's `tiny` (1/tiny = 8.5e37) instead of 1 overflowed the backward to
    inf once |dO . v| > 4, and 0 * inf = NaN."""
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 2, n, 8, generator=gen).requires_grad_() for n in (12, 5))
    v = (10 * torch.randn(1, 2, 5, 8, generator=gen)).requires_grad_()
    out = attention(q, k, v)
    out.backward(torch.randn(out.shape, generator=gen))
    assert torch.equal(out[:, :, :7], torch.zeros_like(out[:, :, :7]))
    for name, t in zip("qkv", (q, k, v), strict=True):
        assert t.grad.isfinite().all(), f"d{name} has non-finite entries"
    assert torch.equal(q.grad[:, :, :7], torch.zeros_like(q.grad[:, :, :7]))
    assert q.grad[:, :, 7:].abs().sum() > 0


@pytest.mark.parametrize("group", [1, 2, 8])  # query heads per K/V head (8 with one K/V head: multi-query)
@pytest.mark.parametrize("causal", [False, True])
def test_grouped_query_heads_read_their_shared_kv_head(group, causal):
    """Query head h reads K/V head h // group: against the per-query loop on each head's own K/V, and against
    SDPA's enable_gqa (an implementation written independently of this one)."""
    heads, kv_heads = 8, 8 // group
    q, k, v = torch.randn(2, heads, 13, 8), torch.randn(2, kv_heads, 13, 8), torch.randn(2, kv_heads, 13, 8)
    got = oracle_attention(q, k, v, causal=causal)
    for h in range(heads):
        own = loop_attention(q[:, h : h + 1], k[:, h // group : h // group + 1], v[:, h // group : h // group + 1], causal)
        assert torch.allclose(got[:, h : h + 1], own, atol=1e-12)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=causal,
                                                            enable_gqa=True)  # fmt: skip
    assert torch.allclose(got, sdpa, atol=1e-12)


def test_grouped_query_heads_that_do_not_divide_are_refused():
    q, k = torch.randn(1, 6, 4, 8), torch.randn(1, 4, 4, 8)
    with pytest.raises(ValueError, match="heads % kv_heads == 0"):
        oracle_attention(q, k, k)


@pytest.mark.parametrize("causal", [False, True])
def test_a_packed_batch_with_a_document_mask_is_each_document_on_its_own(causal):
    """Documents of lengths 1, 17, 300 and 1,000 packed into one sequence: with the document mask, each
    document's output is its own attention, computed alone (the oracle of packed variable-length batches)."""
    from tasks.doc_lengths import cu_seqlens, document_mask_mod

    lengths = [1, 17, 300, 1000]
    cu = cu_seqlens(lengths)
    q, k, v = (torch.randn(1, 2, sum(lengths), 8, dtype=torch.float64) for _ in range(3))
    packed = oracle_attention(q, k, v, mask_mod=document_mask_mod(cu, causal), block_q=512)
    for start, stop in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        alone = oracle_attention(q[:, :, start:stop], k[:, :, start:stop], v[:, :, start:stop], causal=causal)
        assert torch.allclose(packed[:, :, start:stop], alone, atol=1e-12)
