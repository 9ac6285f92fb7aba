"""The block-sparse Triton backward against autograd through the fp64 oracle, under Triton's interpreter on CPU.

Tolerance is tests/test_flash_bwd.py's rule, per gradient: the kernel's max-abs error against autograd
through the fp64 oracle (given the method's own mask) may be at most twice that of autograd through the
method's PyTorch reference in the same dtype, plus a small floor. A wrong list, a missing transposed entry or a
wrong element mask is off by O(1) and fails.

Shapes are small and tiles as big as the patterns allow (the interpreter is fastest with few, large ops):
lengths 37 and 100 are not multiples of any tile, head dim 24 is not a power of two, and cross shapes put the
queries at bottom-right positions (with causal n_q > n_k, the first rows see nothing).
"""

from __future__ import annotations

import pytest
import torch
from helpers import FLOOR, max_err

from methods import METHODS, build
from methods.kernels.block_sparse import block_sparse_forward, kernel_tiles
from methods.kernels.block_sparse_bwd import block_sparse_attention, block_sparse_backward, transposed_lists
from methods.kernels.layout import TileGrid, TokenTerms, build_layout, mask_to_lists, transpose_lists
from methods.masks import terms_mask_mod
from methods.oracle import oracle_attention

Grads = tuple[torch.Tensor, torch.Tensor, torch.Tensor]

# Blocks of 32: big enough for few interpreted tiles, small enough that 100 tokens span several blocks.
PARAMS = {
    "sliding_window": {"window": 40},
    "sink_window": {"window": 40, "sinks": 3},
    "strided": {"stride": 32, "summary": 4},
    "bigbird": {"block": 32, "window_blocks": 3, "global_blocks": 1, "random_blocks": 2},
    "block_topk": {"block": 32, "top_blocks": 2},
}
CASES = [
    # (n_q, n_k, head_dim, dtype, causal)
    (100, 100, 24, torch.float32, True),
    (100, 100, 32, torch.float32, False),
    (37, 100, 24, torch.float32, True),  # fewer queries than keys: bottom-right positions 63..99
    (100, 37, 24, torch.float32, False),  # more queries than keys, non-causal: the band sits at negative positions
    (100, 100, 24, torch.float16, True),
]
CASE_IDS = [f"{a}x{b}-d{d}-{str(t)[6:]}-{'causal' if c else 'full'}" for a, b, d, t, c in CASES]


def _qkv(n_q: int, n_k: int, head_dim: int, dtype: torch.dtype, batch: int = 1, heads: int = 2):
    """Random inputs drawn in fp32 and cast, so the fp64 oracle sees exactly the kernel's numbers."""
    return tuple(torch.randn(batch, heads, n, head_dim).to(dtype) for n in (n_q, n_k, n_k))


def _grads(attention, q, k, v, grad_out, dtype: torch.dtype | None = None) -> Grads:
    """`(dq, dk, dv)` of `attention(q, k, v)` for `grad_out`, with fresh leaves (cast to `dtype` if given)."""
    leaves = [(t if dtype is None else t.to(dtype)).detach().requires_grad_() for t in (q, k, v)]
    out = attention(*leaves)
    return torch.autograd.grad(out, leaves, grad_out.to(out.dtype))


def _mask_mod(name: str, attn, q, k, causal: bool):
    """The method's pattern as a mask_mod; block top-k's depends on the (input-dtype) q and k it selects from."""
    if name == "block_topk":
        return attn.mask_mod(q, k, causal)
    return attn.mask_mod(q.shape[-2], k.shape[-2], causal)


def _check_rule(name: str, kernel: Grads, reference: Grads, exact: Grads, inputs) -> None:
    for x, g, r, e, t in zip("qkv", kernel, reference, exact, inputs, strict=True):
        assert g.shape == t.shape and g.dtype == t.dtype, x
        assert g.isfinite().all(), f"{name}: d{x} has non-finite entries"
        kernel_err, ref_err = max_err(g, e), max_err(r, e)
        bound = 2 * ref_err + FLOOR[t.dtype]
        assert kernel_err <= bound, (
            f"{name}: d{x} kernel err {kernel_err:.3g} > bound {bound:.3g} (ref err {ref_err:.3g})"
        )


@pytest.mark.parametrize("n_q,n_k,head_dim,dtype,causal", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("name", list(PARAMS))
def test_method_grads_within_twice_reference_error(name, n_q, n_k, head_dim, dtype, causal):
    q, k, v = _qkv(n_q, n_k, head_dim, dtype)
    grad_out = torch.randn(q.shape).to(dtype)
    reference = build(name, **PARAMS[name])
    kernel_attn = build(name, impl="kernel", **PARAMS[name])
    mask_mod = _mask_mod(name, reference, q, k, causal)
    kernel = _grads(lambda *t: kernel_attn(*t, causal=causal), q, k, v, grad_out)
    ref = _grads(lambda *t: reference(*t, causal=causal), q, k, v, grad_out)
    assert all(r.isfinite().all() for r in ref), f"{name}: the reference's gradients are not finite"
    exact = _grads(lambda *t: oracle_attention(*t, causal=causal, mask_mod=mask_mod), q, k, v, grad_out, torch.float64)
    _check_rule(name, kernel, ref, exact, (q, k, v))


@pytest.mark.parametrize("name", list(PARAMS))
def test_sparse_kernels_claim_backward(name):
    """The impls that run on the block-sparse kernel claim a backward; topk's gather kernel still does not."""
    assert METHODS[name].impls["kernel"].capabilities.backward
    assert not METHODS["topk"].impls["kernel"].capabilities.backward


def _run_terms(q, k, v, terms: TokenTerms | None, causal: bool, select=None, scale=None):
    n_q, n_k, d = q.shape[-2], k.shape[-2], q.shape[-1]
    pattern_block = 32 if select is not None else None
    grid = TileGrid.bottom_right(n_q, n_k, *kernel_tiles(n_q, n_k, d, pattern_block=pattern_block))
    layout = build_layout(grid, causal, terms, select=None if select is None else select(grid))
    return block_sparse_attention(q, k, v, layout, causal=causal, terms=terms, scale=scale), layout


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_every_term_at_once_and_custom_scale(causal):
    """band | sinks | local | columns in one element mask (partial blocks of every kind), head dim 40, scale 0.3."""
    terms = TokenTerms(band=(5, 3), sinks=2, local=24, columns=(16, 3))
    q, k, v = _qkv(90, 150, 40, torch.float32)
    grad_out = torch.randn(q.shape)
    mask_mod = terms_mask_mod(terms, 60)
    kernel = _grads(lambda *t: _run_terms(*t, terms, causal, scale=0.3)[0], q, k, v, grad_out)
    exact = _grads(
        lambda *t: oracle_attention(*t, causal=causal, mask_mod=mask_mod, scale=0.3), q, k, v, grad_out, torch.float64
    )
    for g, e in zip(kernel, exact, strict=True):
        assert max_err(g, e) < 1e-5


def test_rows_that_see_nothing_get_zero_grads():
    """Causal sliding window with n_q > n_k: the first n_q - n_k rows see no key. Their dq is exactly 0, and
    the gradient flowing into their (zero) output changes nothing in dk, dv."""
    q, k, v = _qkv(100, 37, 24, torch.float32)
    attn = build("sliding_window", impl="kernel", window=16)
    grad_out = torch.randn(q.shape)
    dq, dk, dv = _grads(lambda *t: attn(*t, causal=True), q, k, v, grad_out)
    empty = 100 - 37
    assert torch.equal(dq[:, :, :empty], torch.zeros_like(dq[:, :, :empty]))
    assert dq[:, :, empty:].abs().amax() > 0 and dk.abs().amax() > 0 and dv.abs().amax() > 0
    masked = grad_out.clone()
    masked[:, :, :empty] = 0
    for g, h in zip((dq, dk, dv), _grads(lambda *t: attn(*t, causal=True), q, k, v, masked), strict=True):
        torch.testing.assert_close(g, h, rtol=0, atol=0)


def test_a_tile_with_no_blocks_and_a_block_no_tile_sees():
    """A block table with an empty row (a query tile whose lists are all empty) and an empty column (a key block
    in no list, so its transposed lists are empty): zero dq on that tile, zero dk, dv on that block."""
    q, k, v = _qkv(96, 96, 24, torch.float32)

    def select(grid):
        table = torch.ones(grid.n_tiles, grid.n_key_blocks, dtype=torch.bool)
        table[1] = False  # tile 1 (rows 32..63) sees nothing
        table[:, 2] = False  # key block 2 (keys 64..95) is seen by nobody
        return table

    grad_out = torch.randn(q.shape)
    (dq, dk, dv) = _grads(lambda *t: _run_terms(*t, None, False, select=select)[0], q, k, v, grad_out)
    assert torch.equal(dq[:, :, 32:64], torch.zeros_like(dq[:, :, 32:64]))
    assert torch.equal(dk[:, :, 64:], torch.zeros_like(dk[:, :, 64:]))
    assert torch.equal(dv[:, :, 64:], torch.zeros_like(dv[:, :, 64:]))
    seen = torch.ones(96, 96, dtype=torch.bool)
    seen[32:64] = False
    seen[:, 64:] = False
    exact = _grads(
        lambda *t: oracle_attention(*t, mask_mod=lambda b, h, i, j: seen[i, j]), q, k, v, grad_out, torch.float64
    )
    for g, e in zip((dq, dk, dv), exact, strict=True):
        assert max_err(g, e) < 1e-5


def test_without_grad_it_is_the_forward_kernel():
    """Under no_grad nothing is saved; with grad the output is the same forward, bit for bit."""
    q, k, v = (t.requires_grad_() for t in _qkv(37, 100, 24, torch.float32))
    terms = TokenTerms(band=(20, 0))
    with torch.no_grad():
        out, layout = _run_terms(q, k, v, terms, True)
    assert out.grad_fn is None
    plain = block_sparse_forward(q.detach(), k.detach(), v.detach(), layout, causal=True, terms=terms)
    assert torch.equal(out, plain)
    tracked, _ = _run_terms(q, k, v, terms, True)
    assert tracked.grad_fn is not None and torch.equal(tracked.detach(), plain)


def test_no_keys_gives_zero_grads():
    q, k, v = _qkv(3, 0, 16, torch.float32)
    grid = TileGrid.bottom_right(3, 0, 16)
    layout = build_layout(grid, False, TokenTerms(band=(1, 1)))
    out, lse = block_sparse_forward(q, k, v, layout, causal=False, return_lse=True)
    dq, dk, dv = block_sparse_backward(torch.ones_like(q), q, k, v, out, lse, layout, causal=False)
    assert torch.equal(dq, torch.zeros_like(q)) and dk.shape == k.shape and dv.shape == v.shape


# --- the transposed lists -----------------------------------------------------------------------------------------


def _brute_transpose(num: torch.Tensor, idx: torch.Tensor, n_cols: int) -> torch.Tensor:
    """The (..., n_cols, n_rows) table of which rows list each column, one entry at a time."""
    out = torch.zeros((*idx.shape[:-2], n_cols, idx.shape[-2]), dtype=torch.bool)
    for pos in torch.cartesian_prod(*(torch.arange(s) for s in idx.shape[:-1])).view(-1, idx.dim() - 1).tolist():
        *lead, row = pos
        for e in range(int(num[tuple(pos)])):
            out[(*lead, int(idx[tuple(pos)][e]), row)] = True
    return out


@pytest.mark.parametrize("seed", range(4))
def test_transpose_lists_is_the_brute_force_transpose(seed):
    gen = torch.Generator().manual_seed(seed)
    lead = [(1, 1), (2, 1), (1, 3), (2, 3)][seed]
    n_rows, n_cols = int(torch.randint(1, 9, (1,), generator=gen)), int(torch.randint(1, 9, (1,), generator=gen))
    table = torch.rand(*lead, n_rows, n_cols, generator=gen) < 0.4
    num, idx = mask_to_lists(table)
    num_t, idx_t = transpose_lists(num, idx, n_cols)
    expected = _brute_transpose(num, idx, n_cols)
    assert num_t.dtype == idx_t.dtype == torch.int32 and num_t.shape == (*lead, n_cols)
    assert torch.equal(num_t.long(), expected.sum(-1))
    for pos in torch.cartesian_prod(*(torch.arange(s) for s in num_t.shape)).view(-1, num_t.dim()).tolist():
        rows = idx_t[tuple(pos)]
        count = int(num_t[tuple(pos)])
        assert rows[:count].tolist() == expected[tuple(pos)].nonzero().view(-1).tolist()  # increasing order
        assert (rows[count:] == -1).all()


def test_transpose_lists_ignores_entries_past_the_count():
    num = torch.tensor([1, 0], dtype=torch.int32)
    idx = torch.tensor([[2, 0], [1, 2]], dtype=torch.int32)  # row 0 lists only column 2; row 1 lists nothing
    num_t, idx_t = transpose_lists(num, idx, 3)
    assert num_t.tolist() == [0, 0, 1] and idx_t[2, 0] == 0


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_transposed_layout_keeps_every_pair_in_its_category(causal):
    """Each (tile, key block) pair of each forward list appears once in the same category's transposed list."""
    grid = TileGrid.bottom_right(70, 150, 32)
    layout = build_layout(grid, causal, TokenTerms(band=(40, 0), sinks=3))
    forward = [
        (layout.full_num, layout.full_idx),
        (layout.edge_num, layout.edge_idx),
        (layout.part_num, layout.part_idx),
    ]
    for (num, idx), (num_t, idx_t) in zip(forward, transposed_lists(layout), strict=True):
        by_tile = _brute_transpose(num, idx, grid.n_key_blocks)
        assert torch.equal(by_tile, _brute_transpose(num_t, idx_t, grid.n_tiles).transpose(-1, -2))
        assert by_tile.sum() == num.sum()  # no repeats: each listed pair counted once
