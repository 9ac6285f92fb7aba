"""Block-sparse FlashAttention forward in Triton: the one kernel every sparse-softmax method runs on.

`flash_fwd.py` walks every key block of a query tile; this kernel walks only
the key blocks a per-tile list names, FlexAttention BlockMask style
(`methods/kernels/layout.py` builds the lists). One program owns one query
tile of one (batch, head) and folds three lists into the same online-softmax
state (running max `m_i`, running sum `l_i`, fp32 accumulator `acc`):

1. **full** blocks: every element is visible; no mask and no bounds check
   (the hot loop is flash_fwd's unmasked loop);
2. **edge** blocks: whole blocks the pattern keeps (BigBird's random and
   window blocks, block top-k's picks) cut only by the causal diagonal or the
   end of the keys;
3. **partial** blocks: the pattern's token-level terms are evaluated element
   by element. A Python `mask_mod` cannot run inside Triton, so the terms are
   parametric, switched on by constexpr flags (dead terms compile away):
   `BAND` (`p - left <= j <= p + right`), `SINKS` (`j < n_sinks`),
   `LOCAL` (`j // local == p // local`) and `COLUMNS`
   (`j % stride >= stride - summary`), OR-ed together, AND-ed with causality
   and the key bound. `methods/masks.py` holds the same predicates as
   mask_mods, and the tests hold one against the other.

Positions are bottom-right aligned as everywhere in attnbench (query `i` is
position `i + n_k - n_q`), and query tiles are aligned on *positions*
(`first_pos` is a multiple of `BLOCK_M`), so a tile is exactly one pattern
block even for cross shapes; rows before the first or after the last query
are loaded as zeros and never stored. Rows that see no key output exactly 0
and, when asked, a log-sum-exp of -inf.

`gather_attention` is the companion for per-query key sets (exact top-k,
HyperAttention's sampled columns, decode steps over selected cache entries):
each query row loads its own list of key indices, so it cannot use tensor
cores; it computes scores as row-wise dot products, FlashDecoding style.

Both kernels fold their keys with the online softmax of
`methods/kernels/common.py` (the block-sparse kernel's tile loop body is
flash_fwd's). The gather kernel is forward-only; the block-sparse kernel has
a Triton backward in `block_sparse_bwd.py`, whose `block_sparse_attention` (what the
methods call) uses it when a gradient is needed (`block_sparse_forward` here is
the forward alone), which evaluates the same element mask (`block_keep`). Under Triton's interpreter (`TRITON_INTERPRET=1`) they run on
CPU tensors for the tests; see `common.dot_fp32` for `DOT_FP32`.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from methods.kernels.common import (
    LOG2E,
    attention_tiles,
    check_attention_inputs,
    dot_fp32,
    dot_tile,
    finish_rows,
    fold_key_tile,
    head_offsets,
    interpreting,
    is_dot_tile,
    load_rows,
    online_softmax_step,
    softmax_state,
    store_rows,
    warps_for_head_dim,
)
from methods.kernels.layout import BlockLayout, TokenTerms

__all__ = [
    "block_keep",
    "block_sparse_forward",
    "broadcast_strides",
    "gather_attention",
    "kernel_tiles",
    "stack_lists",
    "term_args",
    "term_flags",
]


@triton.jit
def block_keep(
    p, j, n_k, band_left, band_right, n_sinks, local, col_stride, col_first,
    CAUSAL: tl.constexpr, PATTERN: tl.constexpr, BAND: tl.constexpr, SINKS: tl.constexpr, LOCAL: tl.constexpr,
    COLUMNS: tl.constexpr,
):  # fmt: skip
    """The element mask of an edge (PATTERN=False) or partial block: which (query position `p`, key `j`) pairs count.

    `p` and `j` are broadcastable position tiles (`pos[:, None]`, `keys[None, :]` in the forward and the dQ pass,
    the transpose in the dK/dV pass), so the forward and both backward passes evaluate one definition of the mask.
    """
    keep = j < n_k
    if CAUSAL:
        keep = keep & (j <= p)
    if PATTERN:
        hit = j < 0  # the empty union, OR-ed with each enabled term
        if BAND:
            hit = hit | ((j >= p - band_left) & (j <= p + band_right))
        if SINKS:
            hit = hit | (j < n_sinks)
        if LOCAL:
            # Triton's // truncates; a negative position is in no key's block (keys are >= 0).
            hit = hit | ((j // local) == tl.where(p >= 0, p // local, -1))
        if COLUMNS:
            hit = hit | ((j % col_stride) >= col_first)
        keep = keep & hit
    return keep


@triton.jit
def _fold_blocks(
    acc, l_i, m_i, q, k_base, v_base,
    stride_kn, stride_kd,
    stride_vn, stride_vd,
    idx_ptr, stride_e, num, pos_m, offs_d, n_k, qk_scale,
    band_left, band_right, n_sinks, local, col_stride, col_first,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, PATTERN: tl.constexpr,
    CAUSAL: tl.constexpr, BAND: tl.constexpr, SINKS: tl.constexpr, LOCAL: tl.constexpr,
    COLUMNS: tl.constexpr, DOT_FP32: tl.constexpr,
):  # fmt: skip
    """Fold the `num` key blocks listed at `idx_ptr` into `(acc, l_i, m_i)`.

    MASKED=False is the full-block loop (lists are processed full first, so
    every row's max is finite before a masked block can leave it at -inf).
    """
    for e in range(0, num):
        start_n = tl.load(idx_ptr + e * stride_e) * BLOCK_N
        if MASKED:
            offs_n = start_n + tl.arange(0, BLOCK_N)
            keep = block_keep(
                pos_m[:, None], offs_n[None, :], n_k, band_left, band_right, n_sinks, local, col_stride, col_first,
                CAUSAL, PATTERN, BAND, SINKS, LOCAL, COLUMNS,
            )  # fmt: skip
        else:
            keep = 0  # not read: full blocks take every element
        acc, l_i, m_i = fold_key_tile(
            acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
            start_n, offs_d, n_k, qk_scale, keep,
            HEAD_DIM, BLOCK_N, MASKED, DOT_FP32,
        )  # fmt: skip
    return acc, l_i, m_i


@triton.jit
def _store_rows_and_lse(
    acc, l_i, m_i, o_base, l_base, offs_m, row_ok, stride_om, stride_lm, offs_d, d_ok, stride_od, HAS_LSE: tl.constexpr
):
    """Both kernels' epilogue: the finished rows into `o_base`, and their log-sum-exp into `l_base` if asked."""
    out, lse = finish_rows(acc, l_i, m_i)
    store_rows(o_base, offs_m, row_ok, stride_om, offs_d, d_ok, stride_od, out)
    if HAS_LSE:
        tl.store(l_base + offs_m.to(tl.int64) * stride_lm, lse, mask=row_ok)


@triton.jit
def _block_sparse_fwd_kernel(
    Q, K, V, Out, Lse, Num, Idx,
    stride_qz, stride_qh, stride_qm, stride_qd,
    stride_kz, stride_kh, stride_kn, stride_kd,
    stride_vz, stride_vh, stride_vn, stride_vd,
    stride_oz, stride_oh, stride_om, stride_od,
    stride_lz, stride_lh, stride_lm,
    stride_nl, stride_nz, stride_nh, stride_nt,
    stride_il, stride_iz, stride_ih, stride_it, stride_ie,
    n_heads, n_q, n_k, q_start, first_pos, qk_scale,
    band_left, band_right, n_sinks, local, col_stride, col_first,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, BAND: tl.constexpr, SINKS: tl.constexpr, LOCAL: tl.constexpr,
    COLUMNS: tl.constexpr, HAS_LSE: tl.constexpr, DOT_FP32: tl.constexpr,
):  # fmt: skip
    """One query tile of one (batch, head): grid is `(n_tiles, batch * heads)`."""
    tile = tl.program_id(0)
    _, off_z, off_h = head_offsets(n_heads)
    q_base = Q + off_z * stride_qz + off_h * stride_qh
    k_base = K + off_z * stride_kz + off_h * stride_kh
    v_base = V + off_z * stride_vz + off_h * stride_vh
    o_base = Out + off_z * stride_oz + off_h * stride_oh

    pos_m = first_pos + tile * BLOCK_M + tl.arange(0, BLOCK_M)  # absolute positions of the tile's rows
    offs_m = pos_m - q_start  # their query indices
    offs_d = tl.arange(0, BLOCK_D)
    row_ok, d_ok = (offs_m >= 0) & (offs_m < n_q), offs_d < HEAD_DIM
    q = load_rows(q_base, offs_m, row_ok, stride_qm, offs_d, d_ok, stride_qd)
    if DOT_FP32:
        q = q.to(tl.float32)
    acc, l_i, m_i = softmax_state(BLOCK_M, BLOCK_D)

    num_base = Num + off_z * stride_nz + off_h * stride_nh + tile * stride_nt
    idx_base = Idx + off_z * stride_iz + off_h * stride_ih + tile * stride_it
    # Full blocks first (no mask), then edge blocks (causal + bounds), then partial blocks (+ pattern terms).
    acc, l_i, m_i = _fold_blocks(
        acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
        idx_base, stride_ie, tl.load(num_base), pos_m, offs_d, n_k, qk_scale,
        band_left, band_right, n_sinks, local, col_stride, col_first,
        HEAD_DIM, BLOCK_N, False, False, CAUSAL, BAND, SINKS, LOCAL, COLUMNS, DOT_FP32,
    )  # fmt: skip
    acc, l_i, m_i = _fold_blocks(
        acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
        idx_base + stride_il, stride_ie, tl.load(num_base + stride_nl), pos_m, offs_d, n_k, qk_scale,
        band_left, band_right, n_sinks, local, col_stride, col_first,
        HEAD_DIM, BLOCK_N, True, False, CAUSAL, BAND, SINKS, LOCAL, COLUMNS, DOT_FP32,
    )  # fmt: skip
    acc, l_i, m_i = _fold_blocks(
        acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
        idx_base + 2 * stride_il, stride_ie, tl.load(num_base + 2 * stride_nl), pos_m, offs_d, n_k, qk_scale,
        band_left, band_right, n_sinks, local, col_stride, col_first,
        HEAD_DIM, BLOCK_N, True, True, CAUSAL, BAND, SINKS, LOCAL, COLUMNS, DOT_FP32,
    )  # fmt: skip

    l_base = Lse + off_z * stride_lz + off_h * stride_lh
    _store_rows_and_lse(
        acc, l_i, m_i, o_base, l_base, offs_m, row_ok, stride_om, stride_lm, offs_d, d_ok, stride_od, HAS_LSE
    )


@triton.jit
def _gather_fwd_kernel(
    Q, K, V, Out, Lse, Idx,
    stride_qz, stride_qh, stride_qm, stride_qd,
    stride_kz, stride_kh, stride_kn, stride_kd,
    stride_vz, stride_vh, stride_vn, stride_vd,
    stride_oz, stride_oh, stride_om, stride_od,
    stride_lz, stride_lh, stride_lm,
    stride_iz, stride_ih, stride_im, stride_is,
    n_heads, n_q, n_k, n_sel, qk_scale, excl_block,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    EXCLUDE_OWN_BLOCK: tl.constexpr, HAS_LSE: tl.constexpr,
):  # fmt: skip
    """BLOCK_M query rows of one (batch, head), each over its own `n_sel` key indices (-1 = none)."""
    _, off_z, off_h = head_offsets(n_heads)
    k_base = K + off_z * stride_kz + off_h * stride_kh
    v_base = V + off_z * stride_vz + off_h * stride_vh
    idx_base = Idx + off_z * stride_iz + off_h * stride_ih

    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_s_base = tl.arange(0, BLOCK_N)
    row_ok, d_mask = offs_m < n_q, offs_d < HEAD_DIM
    q = load_rows(Q + off_z * stride_qz + off_h * stride_qh, offs_m, row_ok, stride_qm, offs_d, d_mask, stride_qd)
    q = q.to(tl.float32)
    acc, l_i, m_i = softmax_state(BLOCK_M, BLOCK_D)
    for start in range(0, n_sel, BLOCK_N):
        offs_s = start + offs_s_base
        i_ptrs = idx_base + offs_m[:, None].to(tl.int64) * stride_im + offs_s[None, :] * stride_is
        idx = tl.load(i_ptrs, mask=row_ok[:, None] & (offs_s[None, :] < n_sel), other=-1)
        valid = (idx >= 0) & (idx < n_k)
        if EXCLUDE_OWN_BLOCK:
            # HyperAttention's sampled columns skip the keys the row's own block already covers.
            valid = valid & ((idx // excl_block) != (offs_m // excl_block)[:, None])
        kv_mask = valid[:, :, None] & d_mask[None, None, :]
        row_off = idx.to(tl.int64)[:, :, None]
        k = tl.load(k_base + row_off * stride_kn + offs_d[None, None, :] * stride_kd, mask=kv_mask, other=0.0)
        s = tl.sum(q[:, None, :] * k.to(tl.float32), 2) * qk_scale
        s = tl.where(valid, s, float("-inf"))
        p, alpha, m_i, l_i = online_softmax_step(s, m_i, l_i, True)
        v = tl.load(v_base + row_off * stride_vn + offs_d[None, None, :] * stride_vd, mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v.to(tl.float32), 1)

    o_base = Out + off_z * stride_oz + off_h * stride_oh
    l_base = Lse + off_z * stride_lz + off_h * stride_lh
    _store_rows_and_lse(
        acc, l_i, m_i, o_base, l_base, offs_m, row_ok, stride_om, stride_lm, offs_d, d_mask, stride_od, HAS_LSE
    )


def kernel_tiles(
    n_q: int, n_k: int, head_dim: int, pattern_block: int | None = None, dtype: torch.dtype | None = None
) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N): flash_fwd's (`attention_tiles`: 64 x 64, shrunk for short inputs, and on the GPU for
    head_dim 256 and for fp32).

    With a block-level pattern the tiles must divide its block, so the block
    must be a power of two >= 16 (`tl.dot`'s smallest operand).
    """
    block_m, block_n = attention_tiles(n_q, n_k, head_dim, dtype)
    if pattern_block is not None:
        if not is_dot_tile(pattern_block):
            raise ValueError(f"the block-sparse kernel needs a power-of-two block >= 16, got {pattern_block}")
        block_m, block_n = min(block_m, pattern_block), min(block_n, pattern_block)
    return block_m, block_n


def broadcast_strides(t: torch.Tensor) -> list[int]:
    """Strides with 0 for size-1 dims, so a layout shared by every batch or head broadcasts."""
    return [0 if size == 1 else stride for size, stride in zip(t.shape, t.stride(), strict=True)]


def stack_lists(lists: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The (full, edge, partial) `(num, idx)` lists as one count tensor `(3, Bb, Hb, T)` and one index tensor
    `(3, Bb, Hb, T, L)`, contiguous, so a kernel reaches list `c` at `c * stride` (forward and backward alike)."""
    width = max(i.shape[-1] for _, i in lists)
    pad = [torch.nn.functional.pad(i, (0, width - i.shape[-1]), value=-1) for _, i in lists]
    shape = torch.broadcast_shapes(*(i.shape[:-1] for i in pad), *(n.shape for n, _ in lists))
    idx = torch.stack([i.expand(*shape, width) for i in pad]).contiguous()
    num = torch.stack([n.expand(shape) for n, _ in lists]).contiguous()
    return num, idx


def term_args(terms: TokenTerms) -> tuple[int, int, int, int, int, int]:
    """The runtime scalars `block_keep` reads: `(band_left, band_right, n_sinks, local, col_stride, col_first)`."""
    band_left, band_right = terms.band or (0, 0)
    col_stride, col_summary = terms.columns or (1, 0)
    return band_left, band_right, terms.sinks, max(terms.local, 1), col_stride, col_stride - col_summary


def term_flags(terms: TokenTerms) -> dict[str, bool]:
    """The constexpr switches of `block_keep`'s terms (a term that is off compiles away)."""
    return dict(BAND=terms.band is not None, SINKS=terms.sinks > 0, LOCAL=terms.local > 0, COLUMNS=bool(terms.columns))


def block_sparse_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout,
    *,
    causal: bool,
    terms: TokenTerms | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    out_dtype: torch.dtype | None = None,
):
    """softmax(q k^T * scale) v over the blocks `layout` lists, with `terms` as the element mask of partial blocks.

    The forward kernel alone, never recorded by autograd (`block_sparse_attention` is the differentiable entry).

    Args:
        q: (batch, heads, n_q, head_dim); k, v: (batch, heads, n_k, head_dim); any strides.
        layout: from `methods.kernels.layout.build_layout` on a grid of this call's shape.
        causal: bottom-right causal mask on edge and partial blocks (full blocks are causally visible by construction).
        terms: the token-level pattern evaluated in partial blocks.
        return_lse: also return the natural log-sum-exp per query, (batch, heads, n_q) float32.
        out_dtype: dtype of the output (default q's); float32 keeps partial results exact enough to merge.

    Returns:
        A tensor like `q` (and the lse). Rows that see no key are 0 (lse -inf).
    """
    check_attention_inputs(q, k, v)
    batch, heads, n_q, head_dim = q.shape
    n_k = k.shape[2]
    grid = layout.grid
    if (grid.n_q, grid.n_k) != (n_q, n_k):
        raise ValueError(f"layout is for n_q={grid.n_q}, n_k={grid.n_k}; inputs have n_q={n_q}, n_k={n_k}")
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    out = torch.zeros(q.shape, dtype=out_dtype or q.dtype, device=q.device)
    lse = torch.full((batch, heads, n_q), float("-inf"), dtype=torch.float32, device=q.device)
    if out.numel() == 0 or n_k == 0:
        return (out, lse) if return_lse else out
    terms = terms or TokenTerms()

    layout = layout.to(q.device)
    num, idx = stack_lists(
        [(layout.full_num, layout.full_idx), (layout.edge_num, layout.edge_idx), (layout.part_num, layout.part_idx)]
    )
    block_d = dot_tile(head_dim)
    _block_sparse_fwd_kernel[(grid.n_tiles, batch * heads)](
        q, k, v, out, lse, num, idx,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *lse.stride(),
        *broadcast_strides(num), *broadcast_strides(idx),
        heads, n_q, n_k, grid.q_start, grid.first_tile * grid.block_m, scale * LOG2E,
        *term_args(terms),
        HEAD_DIM=head_dim,
        BLOCK_M=grid.block_m,
        BLOCK_N=grid.block_n,
        BLOCK_D=block_d,
        CAUSAL=bool(causal),
        **term_flags(terms),
        HAS_LSE=return_lse,
        DOT_FP32=dot_fp32(q.dtype),
        num_warps=warps_for_head_dim(block_d),
        num_stages=2,
    )  # fmt: skip
    return (out, lse) if return_lse else out


def gather_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    *,
    scale: float | None = None,
    exclude_block: int = 0,
    return_lse: bool = False,
    out_dtype: torch.dtype | None = None,
):
    """Each query row attends to its own key indices: softmax over `k[indices]`, weights on `v[indices]`.

    Args:
        q: (batch, heads, n_q, head_dim); k, v: (batch, heads, n_k, head_dim).
        indices: (Bb, Hb, n_q or 1, n_sel) integer key indices, -1 = unused slot; size-1 dims broadcast.
        exclude_block: when > 0, row r ignores indices j with j // exclude_block == r // exclude_block
            (HyperAttention's sampled columns next to its block-diagonal part).
        return_lse: also return the natural log-sum-exp per query.
        out_dtype: dtype of the output (default q's).
    """
    check_attention_inputs(q, k, v)
    batch, heads, n_q, head_dim = q.shape
    n_k = k.shape[2]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    out = torch.zeros(q.shape, dtype=out_dtype or q.dtype, device=q.device)
    lse = torch.full((batch, heads, n_q), float("-inf"), dtype=torch.float32, device=q.device)
    n_sel = indices.shape[-1]
    if out.numel() == 0 or n_k == 0 or n_sel == 0:
        return (out, lse) if return_lse else out
    indices = indices.to(device=q.device, dtype=torch.int32)
    block_d = dot_tile(head_dim)
    if interpreting():
        block_m, block_n = 16, 64  # numpy-vectorised tiles: few programs, fast under the interpreter
    else:
        block_n = 32
        block_m = max(1, min(16, 4096 // (block_n * block_d)))  # keep the (M, N, D) tile in registers
    block_n = min(block_n, dot_tile(n_sel))
    _gather_fwd_kernel[(triton.cdiv(n_q, block_m), batch * heads)](
        q, k, v, out, lse, indices,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *lse.stride(), *broadcast_strides(indices),
        heads, n_q, n_k, n_sel, scale * LOG2E, max(exclude_block, 1),
        HEAD_DIM=head_dim,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        EXCLUDE_OWN_BLOCK=exclude_block > 0,
        HAS_LSE=return_lse,
        num_warps=4,
    )  # fmt: skip
    return (out, lse) if return_lse else out
