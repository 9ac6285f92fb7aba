"""Query-dependent methods (block_topk, topk, hyperattention) and memory_efficient: references against oracles.

A selection is checked twice: the keys it picks (recomputed independently
here, in fp64) and the attention over them (the fp64 oracle with the picked
keys as its mask).
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import max_err

from methods import Unsupported, build, get_method
from methods.base import computed_pairs_dense
from methods.masks import dense_mask
from methods.oracle import oracle_attention

LENGTHS = [(1, 1), (17, 17), (100, 100), (300, 300), (17, 300), (300, 17)]
IDS = [f"{a}x{b}" for a, b in LENGTHS]


def inputs(n_q, n_k, d=16, dtype=torch.float32, b=1, h=2):
    return tuple(torch.randn(b, h, n, d).to(dtype) for n in (n_q, n_k, n_k))


def grads_against(attn, mask_mod, causal, n_q=40, n_k=56):
    q, k, v = (t.requires_grad_(True) for t in inputs(n_q, n_k))
    out = attn(q, k, v, causal=causal)
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    ref = oracle_attention(q64, k64, v64, causal=causal, mask_mod=mask_mod(q.detach(), k.detach()))
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), torch.ones_like(ref))
    return max(max_err(g, r) for g, r in zip(grads, ref_grads, strict=True))


def test_registered_as_approximations_except_memory_efficient():
    for name in ("block_topk", "topk", "hyperattention"):
        assert get_method(name).family == "sparse" and not get_method(name).exact
    assert get_method("memory_efficient").family == "exact" and get_method("memory_efficient").exact


# --- block_topk ---------------------------------------------------------------------------------

BT = {"block": 16, "top_blocks": 2}


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("n_q,n_k", LENGTHS, ids=IDS)
def test_block_topk_matches_oracle_on_its_selection(n_q, n_k, causal):
    q, k, v = inputs(n_q, n_k)
    attn = build("block_topk", **BT)
    out = attn(q, k, v, causal=causal)
    assert max_err(out, oracle_attention(q, k, v, causal=causal, mask_mod=attn.mask_mod(q, k, causal))) < 1e-5


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_block_topk_picks_the_best_pooled_blocks(causal):
    """Diagonal block + the top_blocks earlier (causal) / other blocks by mean(q_tile) . mean(k_block), in fp64."""
    block, top, n = 16, 3, 128
    q, k, _ = inputs(n, n, dtype=torch.float64)
    _, table = build("block_topk", block=block, top_blocks=top).selection_table(q, k, causal)
    pq = q.view(1, 2, n // block, block, -1).mean(3)
    pk = k.view(1, 2, n // block, block, -1).mean(3)
    for h in range(2):
        for t in range(n // block):
            candidates = [kb for kb in range(n // block) if kb != t and (kb < t or not causal)]
            scores = {kb: float(pq[0, h, t] @ pk[0, h, kb]) for kb in candidates}
            best = set(sorted(candidates, key=scores.get, reverse=True)[:top])
            assert {int(kb) for kb in table[0, h, t].nonzero()} == best | {t}


def test_block_topk_pairs_and_gradients():
    attn = build("block_topk", **BT)
    # Causal: selected elements exactly, plus half a pair per pooled candidate score.
    q, k, _ = inputs(100, 100)
    mask = dense_mask(attn.mask_mod(q, k, True), 100, 100, True, heads=2)[0, 0]
    n_cand = sum(min(t, 7) for t in range(7))  # 7 tiles of 16; tile t has t earlier blocks
    assert attn.computed_pairs(100, 100, True) == int(mask.sum()) + math.ceil(0.5 * n_cand)
    # Large N: a fraction of dense (top 8 blocks of 64 + the diagonal).
    big = build("block_topk").computed_pairs(16384, 16384, True)
    assert big < 0.1 * computed_pairs_dense(16384, 16384, True)
    assert grads_against(attn, lambda q, k: attn.mask_mod(q, k, True), True) < 1e-4


@pytest.mark.parametrize("impl", ["reference", "kernel"])
def test_block_topk_decode_is_the_one_query_forward(impl):
    """A step pools just its own query (Quest-style): it equals the forward pass with that one query."""
    n, n0 = 70, 40
    q, k, v = inputs(n, n)
    attn = build("block_topk", impl=impl, block=16, top_blocks=1)
    state = attn.prefill(k[:, :, :n0], v[:, :, :n0], extra=n - n0)
    for p in range(n0, n, 3):
        state = attn.prefill(k[:, :, :p], v[:, :, :p], extra=1) if p != n0 else state
        args = (q[:, :, p : p + 1], k[:, :, p : p + 1], v[:, :, p : p + 1])
        out, _ = attn.decode_step(*args, state)
        one = build("block_topk", block=16, top_blocks=1)
        expected = oracle_attention(
            q[:, :, p : p + 1], k[:, :, : p + 1], v[:, :, : p + 1], causal=True,
            mask_mod=one.mask_mod(q[:, :, p : p + 1], k[:, :, : p + 1], True),
        )  # fmt: skip
        assert max_err(out, expected) < 1e-5, f"step {p}"
    # Consecutive steps carry the block sums across a block end.
    state = attn.prefill(k[:, :, :44], v[:, :, :44], extra=8)
    for p in range(44, 52):
        out, state = attn.decode_step(q[:, :, p : p + 1], k[:, :, p : p + 1], v[:, :, p : p + 1], state)
        fresh, _ = attn.decode_step(
            q[:, :, p : p + 1], k[:, :, p : p + 1], v[:, :, p : p + 1], attn.prefill(k[:, :, :p], v[:, :, :p])
        )
        assert max_err(out, fresh.double()) < 1e-6
    b = build("block_topk", block=64)
    assert b.state_bytes(1, 1, 4096, 64, torch.float16) == 2 * 4096 * 64 * 2 + 64 * 64 * 4


# --- topk -----------------------------------------------------------------------------------------


def topk_mask(q, k, top_k, causal):
    """The exact top-k keys of every query, in fp64, as a (b, h, n_q, n_k) mask."""
    n_q, n_k = q.shape[-2], k.shape[-2]
    scores = q.double() @ k.double().transpose(-1, -2)
    if causal:
        scores = scores.masked_fill(~torch.ones(n_q, n_k, dtype=torch.bool).tril(n_k - n_q), float("-inf"))
    top = scores.topk(min(top_k, n_k), dim=-1)
    return torch.zeros_like(scores, dtype=torch.bool).scatter(-1, top.indices, torch.isfinite(top.values))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("n_q,n_k", LENGTHS, ids=IDS)
def test_topk_is_softmax_over_the_exact_top_k(n_q, n_k, causal):
    q, k, v = inputs(n_q, n_k)
    mask = topk_mask(q, k, 10, causal)
    out = build("topk", top_k=10)(q, k, v, causal=causal)
    assert max_err(out, oracle_attention(q, k, v, causal=causal, mask_mod=lambda b, h, i, j: mask[b, h, i, j])) < 1e-5


def test_topk_limits_pairs_and_gradients():
    q, k, v = inputs(60, 60)
    assert max_err(build("topk", top_k=60)(q, k, v, causal=True), oracle_attention(q, k, v, causal=True)) < 1e-5
    attn = build("topk", top_k=8)
    # Selection scores every visible key (half a pair each), then 8 pairs per query (fewer early on).
    assert attn.computed_pairs(60, 60, True) == math.ceil(60 * 61 / 4) + sum(min(8, i + 1) for i in range(60))
    assert attn.flops(__import__("methods").Shape(1, 1, 1, 60, 16, True), "decode") == 4 * 16 * (30 + 8)

    def mask_mod(q, k):
        m = topk_mask(q, k, 8, True)
        return lambda b, h, i, j: m[b, h, i, j]

    assert grads_against(attn, mask_mod, True) < 1e-4


@pytest.mark.parametrize("impl", ["reference", "kernel"])
def test_topk_decode_selects_from_the_full_cache(impl):
    q, k, v = inputs(50, 50)
    mask = topk_mask(q, k, 12, True)
    full = oracle_attention(q, k, v, causal=True, mask_mod=lambda b, h, i, j: mask[b, h, i, j])
    assert max_err(build("topk", impl=impl, top_k=12).decode(q[:, :, -1:], k, v), full[:, :, -1:]) < 1e-5


# --- hyperattention -------------------------------------------------------------------------------

HA = {"block": 32, "n_projs": 4, "min_seq_len": 32}


def hyper_oracle(attn, q, k, v):
    """Dense fp64 softmax with HyperAttention's weights: 1 inside sorted diagonal blocks, n/m per sample elsewhere."""
    b, h, n, d = q.shape
    q_rank = torch.argsort(torch.argsort(attn.codes(q), dim=-1, stable=True), dim=-1)
    k_order = torch.argsort(attn.codes(k), dim=-1, stable=True)
    k_rank = torch.argsort(k_order, dim=-1)
    block = min(attn.block, n)
    same = (q_rank.unsqueeze(-1) // block) == (k_rank.unsqueeze(-2) // block)
    weight = same.double()
    if attn.sample_size and n > block:
        picks = torch.gather(k_order, 2, attn.samples(b, h, n, q.device))  # sampled keys, original order
        counts = torch.zeros(b, h, n, dtype=torch.float64).scatter_add_(
            2, picks, torch.ones_like(picks, dtype=torch.float64)
        )
        weight = weight + torch.where(same, 0.0, counts.unsqueeze(2) * n / attn.sample_size)
    scores = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(d) + torch.log(weight)
    return torch.softmax(scores, dim=-1) @ v.double()


@pytest.mark.parametrize("sample_size", [0, 24])
@pytest.mark.parametrize("n", [1, 17, 100, 300])
def test_hyperattention_non_causal_matches_its_dense_estimator(n, sample_size):
    q, k, v = inputs(n, n)
    attn = build("hyperattention", sample_size=sample_size, **HA)
    assert max_err(attn(q, k, v, causal=False), hyper_oracle(attn, q, k, v)) < 1e-5


def test_hyperattention_non_causal_gradients():
    q, k, v = (t.requires_grad_(True) for t in inputs(100, 100))
    attn = build("hyperattention", sample_size=24, **HA)
    out = attn(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    # The hashes are piecewise constant (no gradient), the weighted softmax is differentiated as usual.
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    ref = hyper_oracle(attn, q64, k64, v64)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), torch.ones_like(ref))
    assert max(max_err(g, r) for g, r in zip(grads, ref_grads, strict=True)) < 1e-4


@pytest.mark.parametrize("n", [17, 100, 301])
def test_hyperattention_causal_recursion(n):
    q, k, v = inputs(n, n)
    exact = oracle_attention(q, k, v, causal=True)
    # With one block per half and exact blocks, every level is exact: the recursion and merges are checked alone.
    whole = build("hyperattention", block=512, sample_size=8, n_projs=4, min_seq_len=16)
    assert max_err(whole(q, k, v, causal=True), exact) < 1e-5
    # With small blocks: the first min_seq_len rows are exact, and no output depends on later keys or values.
    attn = build("hyperattention", sample_size=16, **HA)
    out = attn(q, k, v, causal=True)
    assert max_err(out[:, :, :32], exact[:, :, :32]) < 1e-5
    if n > 40:
        k2, v2 = k.clone(), v.clone()
        k2[:, :, 40:] += 3.0
        v2[:, :, 40:] -= 3.0
        assert max_err(attn(q, k2, v2, causal=True)[:, :, :40], out[:, :, :40].double()) < 1e-6


def test_hyperattention_capabilities_pairs_and_decode():
    attn = build("hyperattention", block=256, sample_size=256, n_projs=7, min_seq_len=1024)
    assert not attn.capabilities.cross
    q, k, v = inputs(10, 20)
    with pytest.raises(Unsupported, match="query length != key length"):
        attn(q, k, v)
    n = 4096
    diag = (n // 256) * 256 * 256
    assert attn.computed_pairs(n, n, False) == diag + n * 256 + n * 7
    half = 2048
    per_half = (half // 256) * 256 * 256 + half * 256 + half * 7
    assert (
        attn.computed_pairs(n, n, True)
        == 2 * (2 * (1024 * 1025 // 2) + ((1024 // 256) * 256**2 + 1024 * 256 + 1024 * 7)) + per_half
    )
    assert attn.computed_pairs(1, n, True) == n  # decode is exact over the full cache
    q, k, v = inputs(40, 40)
    assert (
        max_err(
            build("hyperattention", **HA).decode(q[:, :, -1:], k, v), oracle_attention(q, k, v, causal=True)[:, :, -1:]
        )
        < 1e-5
    )


# --- memory_efficient -----------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("n_q,n_k", LENGTHS, ids=IDS)
def test_memory_efficient_is_exact(n_q, n_k, causal):
    q, k, v = inputs(n_q, n_k)
    out = build("memory_efficient", query_chunk=64, key_chunk=96)(q, k, v, causal=causal)
    assert max_err(out, oracle_attention(q, k, v, causal=causal)) < 1e-5


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_memory_efficient_gradients_through_checkpointed_chunks(causal):
    attn = build("memory_efficient", query_chunk=16, key_chunk=24)
    assert grads_against(attn, lambda q, k: None, causal) < 1e-4
    assert attn.computed_pairs(100, 100, causal) == computed_pairs_dense(100, 100, causal)
