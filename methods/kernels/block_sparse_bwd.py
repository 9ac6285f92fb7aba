"""Triton backward of the block-sparse FlashAttention kernel (`block_sparse.py`), and its autograd wiring.

The math and the scheme are `flash_bwd.py`'s (FlashAttention-2 without
atomics: a `delta = rowsum(dO * O)` pass, a dK/dV pass with one program per
key block, a dQ pass with one program per query tile, P recomputed from the
forward's saved log-sum-exp); only *which* tiles are visited and how they are
masked differ, and those come from the forward's `BlockLayout`:

* the dQ pass walks each query tile's own lists (full, then edge, then
  partial), exactly as the forward did;
* the dK/dV pass walks each key block's *transposed* lists
  (`layout.transpose_lists`): the query tiles whose forward lists name that
  key block, category by category, so every (tile, key block) pair is visited
  once per pass with the element mask the forward applied to it.

Element masks are `block_sparse.block_keep` (the forward's definition:
causal diagonal, key bound, band / sinks / local / column terms, bottom-right
positions), evaluated on `(pos[:, None], keys[None, :])` in the dQ pass and on
the transpose in the dK/dV pass. Per-tile recompute steps (`dq_tile`,
`dkdv_tile`), the delta pass and the row statistics are imported from
`flash_bwd.py`, not copied. Rows that see no key have lse -inf, read as +inf
(`row_stats`), so their P is exactly 0: dq is 0 there and they add nothing to
dk, dv, never NaN. Padded rows of a position-aligned tile load as zeros with
lse +inf, the same way.

Tiles are the forward layout's (the lists are built for them), so unlike the
dense backward there is no shrinking for wide heads: this backward has been
run only under Triton's interpreter so far.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from methods.kernels.block_sparse import (
    block_keep,
    block_sparse_forward,
    broadcast_strides,
    stack_lists,
    term_args,
    term_flags,
)
from methods.kernels.common import (
    LOG2E,
    check_attention_inputs,
    dot_fp32,
    dot_tile,
    head_offsets,
    load_rows,
    store_rows,
    warps_for_head_dim,
)
from methods.kernels.flash_bwd import delta_kernel, dkdv_tile, dq_tile, key_block, row_stats
from methods.kernels.layout import BlockLayout, TokenTerms, transpose_lists

__all__ = ["BlockSparseAttentionFunction", "block_sparse_backward", "transposed_lists"]


@triton.jit
def _dq_blocks(
    dq, q, do, lse2, delta, k_base, v_base,
    stride_kn, stride_kd, stride_vn, stride_vd,
    idx_ptr, stride_e, num, pos_m, offs_d, n_k, qk_scale,
    band_left, band_right, n_sinks, local, col_stride, col_first,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, PATTERN: tl.constexpr,
    CAUSAL: tl.constexpr, BAND: tl.constexpr, SINKS: tl.constexpr, LOCAL: tl.constexpr,
    COLUMNS: tl.constexpr, DOT_FP32: tl.constexpr,
):  # fmt: skip
    """Fold the `num` key blocks listed at `idx_ptr` into one query tile's `dq` (the forward's `_fold_blocks`)."""
    d_ok = offs_d < HEAD_DIM
    for e in range(0, num):
        offs_n = tl.load(idx_ptr + e * stride_e) * BLOCK_N + tl.arange(0, BLOCK_N)
        key_ok = offs_n < n_k
        k = load_rows(k_base, offs_n, key_ok, stride_kn, offs_d, d_ok, stride_kd)
        v = load_rows(v_base, offs_n, key_ok, stride_vn, offs_d, d_ok, stride_vd)
        if DOT_FP32:
            k, v = k.to(tl.float32), v.to(tl.float32)
        if MASKED:
            keep = block_keep(
                pos_m[:, None], offs_n[None, :], n_k, band_left, band_right, n_sinks, local, col_stride, col_first,
                CAUSAL, PATTERN, BAND, SINKS, LOCAL, COLUMNS,
            )  # fmt: skip
        else:
            keep = 0  # not read: full blocks take every element
        dq = dq_tile(dq, q, do, lse2, delta, k, v, keep, qk_scale, MASKED, DOT_FP32)
    return dq


@triton.jit
def _bs_dq_kernel(
    Q, K, V, DO, Lse, Delta, DQ, Num, Idx,
    stride_qz, stride_qh, stride_qm, stride_qd,
    stride_kz, stride_kh, stride_kn, stride_kd,
    stride_vz, stride_vh, stride_vn, stride_vd,
    stride_dz, stride_dh, stride_dm, stride_dd,
    stride_dqz, stride_dqh, stride_dqm, stride_dqd,
    stride_nl, stride_nz, stride_nh, stride_nt,
    stride_il, stride_iz, stride_ih, stride_it, stride_ie,
    n_heads, n_q, n_k, q_start, first_pos, scale, qk_scale,
    band_left, band_right, n_sinks, local, col_stride, col_first,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, BAND: tl.constexpr, SINKS: tl.constexpr, LOCAL: tl.constexpr,
    COLUMNS: tl.constexpr, DOT_FP32: tl.constexpr,
):  # fmt: skip
    """`dQ` of one position-aligned query tile of one (batch, head): grid `(n_tiles, batch * heads)`."""
    tile = tl.program_id(0)
    off_bh, off_z, off_h = head_offsets(n_heads)
    k_base = K + off_z * stride_kz + off_h * stride_kh
    v_base = V + off_z * stride_vz + off_h * stride_vh

    pos_m = first_pos + tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_m = pos_m - q_start
    offs_d = tl.arange(0, BLOCK_D)
    row_ok, d_ok = (offs_m >= 0) & (offs_m < n_q), offs_d < HEAD_DIM
    q = load_rows(Q + off_z * stride_qz + off_h * stride_qh, offs_m, row_ok, stride_qm, offs_d, d_ok, stride_qd)
    do = load_rows(DO + off_z * stride_dz + off_h * stride_dh, offs_m, row_ok, stride_dm, offs_d, d_ok, stride_dd)
    if DOT_FP32:
        q, do = q.to(tl.float32), do.to(tl.float32)
    lse2, delta = row_stats(Lse + off_bh.to(tl.int64) * n_q, Delta + off_bh.to(tl.int64) * n_q, offs_m, row_ok)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    num_base = Num + off_z * stride_nz + off_h * stride_nh + tile * stride_nt
    idx_base = Idx + off_z * stride_iz + off_h * stride_ih + tile * stride_it
    # The forward's three lists in its order: full (no mask), edge (causal + bounds), partial (+ pattern terms).
    dq = _dq_blocks(
        dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
        idx_base, stride_ie, tl.load(num_base), pos_m, offs_d, n_k, qk_scale,
        band_left, band_right, n_sinks, local, col_stride, col_first,
        HEAD_DIM, BLOCK_N, False, False, CAUSAL, BAND, SINKS, LOCAL, COLUMNS, DOT_FP32,
    )  # fmt: skip
    dq = _dq_blocks(
        dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
        idx_base + stride_il, stride_ie, tl.load(num_base + stride_nl), pos_m, offs_d, n_k, qk_scale,
        band_left, band_right, n_sinks, local, col_stride, col_first,
        HEAD_DIM, BLOCK_N, True, False, CAUSAL, BAND, SINKS, LOCAL, COLUMNS, DOT_FP32,
    )  # fmt: skip
    dq = _dq_blocks(
        dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
        idx_base + 2 * stride_il, stride_ie, tl.load(num_base + 2 * stride_nl), pos_m, offs_d, n_k, qk_scale,
        band_left, band_right, n_sinks, local, col_stride, col_first,
        HEAD_DIM, BLOCK_N, True, True, CAUSAL, BAND, SINKS, LOCAL, COLUMNS, DOT_FP32,
    )  # fmt: skip
    dq_base = DQ + off_z * stride_dqz + off_h * stride_dqh
    store_rows(dq_base, offs_m, row_ok, stride_dqm, offs_d, d_ok, stride_dqd, dq * scale)


@triton.jit
def _dkdv_tiles(
    dk, dv, k, v, q_base, do_base, lse_base, delta_base,
    stride_qm, stride_qd, stride_dm, stride_dd,
    idx_ptr, stride_e, num, offs_n, offs_d, n_q, n_k, q_start, first_pos, qk_scale,
    band_left, band_right, n_sinks, local, col_stride, col_first,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, MASKED: tl.constexpr, PATTERN: tl.constexpr,
    CAUSAL: tl.constexpr, BAND: tl.constexpr, SINKS: tl.constexpr, LOCAL: tl.constexpr,
    COLUMNS: tl.constexpr, DOT_FP32: tl.constexpr,
):  # fmt: skip
    """Fold the `num` query tiles listed at `idx_ptr` (those whose forward lists name this key block in one
    category) into the key block's `(dk, dv)`; tiles are transposed (keys x queries), as in `flash_bwd`."""
    d_ok = offs_d < HEAD_DIM
    for e in range(0, num):
        pos_m = first_pos + tl.load(idx_ptr + e * stride_e) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_m = pos_m - q_start
        row_ok = (offs_m >= 0) & (offs_m < n_q)
        q = load_rows(q_base, offs_m, row_ok, stride_qm, offs_d, d_ok, stride_qd)
        do = load_rows(do_base, offs_m, row_ok, stride_dm, offs_d, d_ok, stride_dd)
        if DOT_FP32:
            q, do = q.to(tl.float32), do.to(tl.float32)
        lse2, delta = row_stats(lse_base, delta_base, offs_m, row_ok)
        if MASKED:
            keep_t = block_keep(
                pos_m[None, :], offs_n[:, None], n_k, band_left, band_right, n_sinks, local, col_stride, col_first,
                CAUSAL, PATTERN, BAND, SINKS, LOCAL, COLUMNS,
            )  # fmt: skip
        else:
            keep_t = 0  # not read: full blocks take every element
        dk, dv = dkdv_tile(dk, dv, k, v, q, do, lse2, delta, keep_t, qk_scale, MASKED, DOT_FP32)
    return dk, dv


@triton.jit
def _bs_dkdv_kernel(
    Q, K, V, DO, Lse, Delta, DK, DV, Num, Idx,
    stride_qz, stride_qh, stride_qm, stride_qd,
    stride_kz, stride_kh, stride_kn, stride_kd,
    stride_vz, stride_vh, stride_vn, stride_vd,
    stride_dz, stride_dh, stride_dm, stride_dd,
    stride_dkz, stride_dkh, stride_dkn, stride_dkd,
    stride_dvz, stride_dvh, stride_dvn, stride_dvd,
    stride_nl, stride_nz, stride_nh, stride_nt,
    stride_il, stride_iz, stride_ih, stride_it, stride_ie,
    n_heads, n_q, n_k, q_start, first_pos, scale, qk_scale,
    band_left, band_right, n_sinks, local, col_stride, col_first,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, BAND: tl.constexpr, SINKS: tl.constexpr, LOCAL: tl.constexpr,
    COLUMNS: tl.constexpr, DOT_FP32: tl.constexpr,
):  # fmt: skip
    """`dK`, `dV` of one key block of one (batch, head): grid `(n_key_blocks, batch * heads)`.

    A key block no tile visits gets zeros (its transposed lists are empty).
    """
    blk = tl.program_id(0)
    off_bh, off_z, off_h = head_offsets(n_heads)
    q_base = Q + off_z * stride_qz + off_h * stride_qh
    do_base = DO + off_z * stride_dz + off_h * stride_dh
    lse_base = Lse + off_bh.to(tl.int64) * n_q
    delta_base = Delta + off_bh.to(tl.int64) * n_q

    offs_n, offs_d, key_ok, d_ok, k, v = key_block(
        K + off_z * stride_kz + off_h * stride_kh, V + off_z * stride_vz + off_h * stride_vh,
        stride_kn, stride_kd, stride_vn, stride_vd, blk * BLOCK_N, n_k, HEAD_DIM, BLOCK_N, BLOCK_D, DOT_FP32,
    )  # fmt: skip
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    num_base = Num + off_z * stride_nz + off_h * stride_nh + blk * stride_nt
    idx_base = Idx + off_z * stride_iz + off_h * stride_ih + blk * stride_it
    dk, dv = _dkdv_tiles(
        dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_qd, stride_dm, stride_dd,
        idx_base, stride_ie, tl.load(num_base), offs_n, offs_d, n_q, n_k, q_start, first_pos, qk_scale,
        band_left, band_right, n_sinks, local, col_stride, col_first,
        HEAD_DIM, BLOCK_M, False, False, CAUSAL, BAND, SINKS, LOCAL, COLUMNS, DOT_FP32,
    )  # fmt: skip
    dk, dv = _dkdv_tiles(
        dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_qd, stride_dm, stride_dd,
        idx_base + stride_il, stride_ie, tl.load(num_base + stride_nl), offs_n, offs_d, n_q, n_k, q_start,
        first_pos, qk_scale, band_left, band_right, n_sinks, local, col_stride, col_first,
        HEAD_DIM, BLOCK_M, True, False, CAUSAL, BAND, SINKS, LOCAL, COLUMNS, DOT_FP32,
    )  # fmt: skip
    dk, dv = _dkdv_tiles(
        dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_qd, stride_dm, stride_dd,
        idx_base + 2 * stride_il, stride_ie, tl.load(num_base + 2 * stride_nl), offs_n, offs_d, n_q, n_k, q_start,
        first_pos, qk_scale, band_left, band_right, n_sinks, local, col_stride, col_first,
        HEAD_DIM, BLOCK_M, True, True, CAUSAL, BAND, SINKS, LOCAL, COLUMNS, DOT_FP32,
    )  # fmt: skip

    dk_base = DK + off_z * stride_dkz + off_h * stride_dkh
    dv_base = DV + off_z * stride_dvz + off_h * stride_dvh
    store_rows(dk_base, offs_n, key_ok, stride_dkn, offs_d, d_ok, stride_dkd, dk * scale)
    store_rows(dv_base, offs_n, key_ok, stride_dvn, offs_d, d_ok, stride_dvd, dv)


# --- host side --------------------------------------------------------------------------------------------------------


def transposed_lists(layout: BlockLayout) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per key block, the (full, edge, partial) lists of query tiles that visit it: the dK/dV pass's lists."""
    n_blocks = layout.grid.n_key_blocks
    return [
        transpose_lists(num, idx, n_blocks)
        for num, idx in (
            (layout.full_num, layout.full_idx),
            (layout.edge_num, layout.edge_idx),
            (layout.part_num, layout.part_idx),
        )
    ]


def block_sparse_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    layout: BlockLayout,
    *,
    causal: bool,
    terms: TokenTerms | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(dq, dk, dv)` of `out = block_sparse_forward(q, k, v, layout, causal=..., terms=..., scale=...)`.

    Args:
        grad_out, out: `(batch, heads, n_q, head_dim)`, any strides; `out` is the forward's output.
        q, k, v, layout, causal, terms, scale: the forward's arguments.
        lse: the forward's `(batch, heads, n_q)` natural log-sum-exp (`return_lse=True`).

    Returns:
        Gradients shaped and typed like `q`, `k`, `v`. Rows that see no key get 0.
    """
    check_attention_inputs(q, k, v)
    for name, t in (("grad_out", grad_out), ("out", out)):
        if t.shape != q.shape:
            raise ValueError(f"{name} must be shaped like q {tuple(q.shape)}, got {tuple(t.shape)}")
    batch, heads, n_q, head_dim = q.shape
    n_k = k.shape[2]
    grid = layout.grid
    if (grid.n_q, grid.n_k) != (n_q, n_k):
        raise ValueError(f"layout is for n_q={grid.n_q}, n_k={grid.n_k}; inputs have n_q={n_q}, n_k={n_k}")
    if lse.shape != (batch, heads, n_q):
        raise ValueError(f"lse must be (batch, heads, n_q) = {(batch, heads, n_q)}, got {tuple(lse.shape)}")
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    dq, dk, dv = (torch.zeros(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    if q.numel() == 0 or n_k == 0:
        return dq, dk, dv
    terms = terms or TokenTerms()
    layout = layout.to(q.device)

    lse = lse.to(torch.float32).contiguous()  # the passes address lse and delta with one contiguous offset
    delta = torch.empty_like(lse)
    block_d = dot_tile(head_dim)
    warps = warps_for_head_dim(block_d)
    delta_kernel[(triton.cdiv(n_q, grid.block_m), batch * heads)](
        out, grad_out, delta, *out.stride(), *grad_out.stride(), heads, n_q,
        HEAD_DIM=head_dim, BLOCK_M=grid.block_m, BLOCK_D=block_d, num_warps=warps,
    )  # fmt: skip

    common = dict(
        HEAD_DIM=head_dim,
        BLOCK_M=grid.block_m,
        BLOCK_N=grid.block_n,
        BLOCK_D=block_d,
        CAUSAL=bool(causal),
        **term_flags(terms),
        DOT_FP32=dot_fp32(q.dtype),
        num_warps=warps,
        num_stages=1,
    )
    scalars = (heads, n_q, n_k, grid.q_start, grid.first_tile * grid.block_m, scale, scale * LOG2E, *term_args(terms))
    num_t, idx_t = stack_lists(transposed_lists(layout))
    _bs_dkdv_kernel[(grid.n_key_blocks, batch * heads)](
        q, k, v, grad_out, lse, delta, dk, dv, num_t, idx_t,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dk.stride(), *dv.stride(),
        *broadcast_strides(num_t), *broadcast_strides(idx_t),
        *scalars, **common,
    )  # fmt: skip
    num, idx = stack_lists(
        [(layout.full_num, layout.full_idx), (layout.edge_num, layout.edge_idx), (layout.part_num, layout.part_idx)]
    )
    _bs_dq_kernel[(grid.n_tiles, batch * heads)](
        q, k, v, grad_out, lse, delta, dq, num, idx,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dq.stride(),
        *broadcast_strides(num), *broadcast_strides(idx),
        *scalars, **common,
    )  # fmt: skip
    return dq, dk, dv


class BlockSparseAttentionFunction(torch.autograd.Function):
    """Autograd node for the block-sparse kernels: the forward saves `(q, k, v, out, lse)` and keeps the layout
    and terms, the backward recomputes P over the same blocks. Differentiable once (`once_differentiable`)."""

    @staticmethod
    def forward(ctx, q, k, v, layout: BlockLayout, causal: bool, terms: TokenTerms | None, scale: float | None):
        out, lse = block_sparse_forward(q, k, v, layout, causal=causal, terms=terms, scale=scale, return_lse=True)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.layout, ctx.causal, ctx.terms, ctx.scale = layout, causal, terms, scale
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = block_sparse_backward(
            grad_out, q, k, v, out, lse, ctx.layout, causal=ctx.causal, terms=ctx.terms, scale=ctx.scale
        )
        return dq, dk, dv, None, None, None, None


def block_sparse_attention(
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
    """`block_sparse_forward`, differentiable through this module's Triton backward (the entry point the methods call).

    Autograd is wired only where it is asked for (an input requires grad, grad
    mode on) and for the plain output: with `return_lse` or a different
    `out_dtype` (the merge paths of HyperAttention and decode, which are not
    trained) it is the forward kernel alone, as when no gradient is needed, so
    forward-only timings never pay for a saved lse.
    """
    wants_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if wants_grad and not return_lse and out_dtype in (None, q.dtype):
        return BlockSparseAttentionFunction.apply(q, k, v, layout, causal, terms, scale)
    return block_sparse_forward(
        q, k, v, layout, causal=causal, terms=terms, scale=scale, return_lse=return_lse, out_dtype=out_dtype
    )
