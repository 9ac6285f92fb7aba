"""The block-sparse and gather Triton kernels under the interpreter, and the block lists that drive them.

Tolerance follows tests/test_kernel_flash_fwd.py: a kernel's max-abs error
against the fp64 oracle (given the method's own pattern or selection) may be
at most twice that of the method's PyTorch reference in the same dtype, plus
a small floor. A masking, list or rescaling bug is off by O(1) and fails.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers import FLOOR, max_err

from methods import build
from methods.kernels.block_sparse import gather_attention, kernel_tiles
from methods.kernels.block_sparse_bwd import block_sparse_attention
from methods.kernels.layout import TileGrid, TokenTerms, build_layout
from methods.masks import dense_mask, terms_mask_mod
from methods.oracle import oracle_attention

PARAMS = {
    "sliding_window": {"window": 40},
    "sink_window": {"window": 40, "sinks": 3},
    "strided": {"stride": 32, "summary": 4},
    "bigbird": {"block": 32, "window_blocks": 3, "global_blocks": 1, "random_blocks": 2},
    "block_topk": {"block": 32, "top_blocks": 2},
}
CASES = [
    (300, 300, True, torch.float32),
    (100, 100, False, torch.float32),
    (17, 300, True, torch.float32),
    (300, 17, False, torch.float32),
    (300, 300, True, torch.float16),
    (100, 130, False, torch.float16),
]


def inputs(n_q, n_k, d=32, dtype=torch.float32, b=1, h=2):
    return tuple(torch.randn(b, h, n, d).to(dtype) for n in (n_q, n_k, n_k))


def mask_of(name, attn, q, k, causal):
    if name == "block_topk":
        return attn.mask_mod(q, k, causal)
    return attn.mask_mod(q.shape[-2], k.shape[-2], causal)


def check_rule(kernel_out, reference_out, exact, dtype):
    assert kernel_out.dtype == dtype and not torch.isnan(kernel_out).any()
    kernel_err, ref_err = max_err(kernel_out, exact), max_err(reference_out, exact)
    bound = 2 * ref_err + FLOOR[dtype]
    assert kernel_err <= bound, f"kernel err {kernel_err:.3g} > bound {bound:.3g} (reference err {ref_err:.3g})"


@pytest.mark.parametrize(
    "n_q,n_k,causal,dtype", CASES, ids=[f"{a}x{b}-{'c' if c else 'f'}-{str(t)[6:]}" for a, b, c, t in CASES]
)
@pytest.mark.parametrize("name", list(PARAMS))
def test_kernel_within_twice_reference_error(name, n_q, n_k, causal, dtype):
    q, k, v = inputs(n_q, n_k, dtype=dtype)
    reference = build(name, **PARAMS[name])
    exact = oracle_attention(q, k, v, causal=causal, mask_mod=mask_of(name, reference, q, k, causal))
    out = build(name, impl="kernel", **PARAMS[name])(q, k, v, causal=causal)
    check_rule(out, reference(q, k, v, causal=causal), exact, dtype)


@pytest.mark.parametrize("n_q,n_k,causal,dtype", [(300, 300, True, torch.float32), (100, 80, False, torch.float16)])
def test_topk_gather_kernel(n_q, n_k, causal, dtype):
    q, k, v = inputs(n_q, n_k, dtype=dtype)
    attn = build("topk", top_k=24)
    scores = q.double() @ k.double().transpose(-1, -2)
    if causal:
        scores = scores.masked_fill(~torch.ones(n_q, n_k, dtype=torch.bool).tril(n_k - n_q), float("-inf"))
    top = scores.topk(24, dim=-1)
    mask = torch.zeros_like(scores, dtype=torch.bool).scatter(-1, top.indices, torch.isfinite(top.values))
    exact = oracle_attention(q, k, v, causal=causal, mask_mod=lambda b, h, i, j: mask[b, h, i, j])
    check_rule(
        build("topk", impl="kernel", top_k=24)(q, k, v, causal=causal), attn(q, k, v, causal=causal), exact, dtype
    )


@pytest.mark.parametrize(
    "n,causal,dtype", [(300, False, torch.float32), (301, True, torch.float32), (200, True, torch.float16)]
)
def test_hyperattention_kernel_matches_reference(n, causal, dtype):
    """Same hashes, same samples: the kernel path (sort + block-sparse + gather kernels) computes the same estimate."""
    params = {"block": 64, "sample_size": 24, "n_projs": 4, "min_seq_len": 64}
    q, k, v = inputs(n, n, dtype=dtype)
    ref_attn = build("hyperattention", **params)
    reference = ref_attn(q, k, v, causal=causal)
    exact = ref_attn(q.double(), k.double(), v.double(), causal=causal)  # the estimator itself, in fp64
    check_rule(build("hyperattention", impl="kernel", **params)(q, k, v, causal=causal), reference, exact, dtype)


@pytest.mark.parametrize("causal", [False, True])
def test_memory_efficient_kernel_is_flash(causal):
    q, k, v = inputs(130, 200)
    exact = oracle_attention(q, k, v, causal=causal)
    check_rule(
        build("memory_efficient", impl="kernel")(q, k, v, causal=causal),
        build("memory_efficient")(q, k, v, causal=causal),
        exact,
        torch.float32,
    )


# --- the kernel's own contract ------------------------------------------------------------------


def run_terms(q, k, v, terms, causal, return_lse=False):
    n_q, n_k, d = q.shape[-2], k.shape[-2], q.shape[-1]
    grid = TileGrid.bottom_right(n_q, n_k, *kernel_tiles(n_q, n_k, d))
    layout = build_layout(grid, causal, terms)
    return block_sparse_attention(q, k, v, layout, causal=causal, terms=terms, return_lse=return_lse)


@pytest.mark.parametrize("d", [16, 80, 128])
def test_every_term_at_once_other_head_dims_and_lse(d):
    """band | sinks | local | columns in one element mask, non-power-of-two head dim, log-sum-exp output."""
    terms = TokenTerms(band=(5, 3), sinks=2, local=24, columns=(16, 3))
    q, k, v = inputs(90, 150, d=d)
    out, lse = run_terms(q, k, v, terms, causal=True, return_lse=True)
    mask = dense_mask(terms_mask_mod(terms, 60), 90, 150, causal=True)
    assert max_err(out, oracle_attention(q, k, v, causal=True, mask_mod=terms_mask_mod(terms, 60))) < 1e-5
    scores = (q.double() @ k.double().transpose(-1, -2)) / d**0.5
    assert max_err(lse, torch.logsumexp(scores.masked_fill(~mask, float("-inf")), -1)) < 1e-4


def test_rows_without_keys_are_zero_with_lse_minus_inf():
    """Non-causal band, more queries than keys: the first queries sit before every key and see none."""
    terms = TokenTerms(band=(4, 4))
    q, k, v = inputs(100, 20)
    out, lse = run_terms(q, k, v, terms, causal=False, return_lse=True)
    empty = dense_mask(terms_mask_mod(terms, -80), 100, 20, causal=False)[0, 0].sum(-1) == 0
    assert empty.sum() > 50 and torch.equal(out[:, :, empty], torch.zeros_like(out[:, :, empty]))
    assert torch.isneginf(lse[:, :, empty]).all() and torch.isfinite(lse[:, :, ~empty]).all()
    assert max_err(out, oracle_attention(q, k, v, mask_mod=terms_mask_mod(terms, -80))) < 1e-5


def test_non_contiguous_inputs_and_per_head_layouts():
    """Strided (B, N, H, D) views, and a block table that differs per head (as block top-k's does)."""
    q = torch.randn(2, 100, 2, 32).transpose(1, 2)
    k = torch.randn(2, 130, 2, 32).transpose(1, 2)
    v = torch.randn(2, 2, 130, 64)[..., ::2]
    attn = build("block_topk", block=32, top_blocks=1)
    out = build("block_topk", impl="kernel", block=32, top_blocks=1)(q, k, v, causal=True)
    assert max_err(out, oracle_attention(q, k, v, causal=True, mask_mod=attn.mask_mod(q, k, True))) < 1e-5
    _, table = attn.selection_table(q, k, True)
    assert not torch.equal(table[0, 0], table[1, 1])  # heads really picked different blocks


@pytest.mark.parametrize("seed", range(6))
def test_layout_lists_cover_the_pattern_soundly(seed):
    """Brute force: every visible element is in a listed block; `full` blocks are visible throughout; no repeats."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda lo, hi: int(torch.randint(lo, hi, (1,), generator=gen))  # noqa: E731
    n_q, n_k, causal = r(1, 200), r(1, 200), bool(seed % 2)
    terms = TokenTerms(
        band=(r(0, 40), r(0, 40)) if seed % 3 else None,
        sinks=r(0, 5),
        local=r(0, 3) * 16,
        columns=(16, r(1, 4)) if seed > 2 else None,
    )
    bm, bn = [16, 32][seed % 2], [16, 32, 64][seed % 3]
    grid = TileGrid.bottom_right(n_q, n_k, bm, bn)
    layout = build_layout(grid, causal, terms)
    pattern = terms_mask_mod(terms, n_k - n_q)  # None: no term set, so no key is visible
    mask = (
        dense_mask(pattern, n_q, n_k, causal)[0, 0] if pattern is not None else torch.zeros(n_q, n_k, dtype=torch.bool)
    )
    listed = {}
    for kind in ("full", "edge", "part"):
        num, idx = getattr(layout, f"{kind}_num")[0, 0], getattr(layout, f"{kind}_idx")[0, 0]
        for t in range(grid.n_tiles):
            for kb in idx[t, : num[t]].tolist():
                assert (t, kb) not in listed
                listed[(t, kb)] = kind
    assert not any(kind == "edge" for kind in listed.values())  # no whole-block selection was given
    rows = torch.arange(n_q) + n_k - n_q - grid.first_tile * bm
    for t, kb in itertools.product(range(grid.n_tiles), range(grid.n_key_blocks)):
        block = mask[(rows // bm) == t][:, kb * bn : (kb + 1) * bn]
        if block.any():
            assert (t, kb) in listed
        if listed.get((t, kb)) == "full":
            assert block.all() and block.shape[1] == bn


def test_gather_kernel_indices():
    """-1 slots are skipped, repeated indices count twice, size-1 dims broadcast, exclude_block drops own-block keys."""
    q, k, v = inputs(40, 70)
    idx = torch.rand(1, 2, 40, 70).argsort(-1)[..., :20]
    idx[..., ::3] = -1
    chosen = torch.zeros(1, 2, 40, 71, dtype=torch.bool).scatter(-1, idx + 1, True)[..., 1:]
    out, lse = gather_attention(q, k, v, idx, return_lse=True)
    assert max_err(out, oracle_attention(q, k, v, mask_mod=lambda b, h, i, j: chosen[b, h, i, j])) < 1e-5
    scores = (q.double() @ k.double().transpose(-1, -2)) / 32**0.5
    assert max_err(lse, torch.logsumexp(scores.masked_fill(~chosen, float("-inf")), -1)) < 1e-4

    shared = torch.tensor([3, 3, 10, 50, -1]).view(1, 1, 1, -1)  # one list for every row and head
    weights = torch.tensor([2.0, 1.0, 1.0])  # key 3 appears twice
    s = scores[..., [3, 10, 50]] + weights.log()
    expected = torch.softmax(s, -1) @ v.double()[:, :, [3, 10, 50]]
    assert max_err(gather_attention(q, k, v, shared), expected) < 1e-5

    own = (torch.arange(70) // 8).view(1, -1) == (torch.arange(40) // 8).view(-1, 1)
    every = torch.arange(70).view(1, 1, 1, -1)
    out = gather_attention(q, k, v, every, exclude_block=8)
    assert max_err(out, oracle_attention(q, k, v, mask_mod=lambda b, h, i, j: ~own[i, j])) < 1e-5


def test_layout_for_another_shape_is_refused():
    q, k, v = inputs(40, 40)
    layout = build_layout(TileGrid.bottom_right(41, 40, 16), False, TokenTerms(band=(2, 2)))
    with pytest.raises(ValueError, match="layout is for"):
        block_sparse_attention(q, k, v, layout, causal=False)
