"""FlashAttention-2-style backward pass in Triton, and the autograd wiring that pairs it with `flash_fwd.py`.

The forward keeps only the output and each row's log-sum-exp (`lse`); the
backward recomputes the probabilities tile by tile as `P = exp(S - lse)`, so,
as in the forward, the N x N score matrix never exists in memory. With
`dO` the output's gradient and `S = scale * Q K^T`:

    dV = P^T dO                 dP = dO V^T
    dS = P * (dP - delta)       delta = rowsum(dO * O)   (= rowsum(P * dP), one number per query)
    dQ = scale * dS K           dK = scale * dS^T Q

Three launches, FlashAttention-2's scheme without atomics (as Triton's
fused-attention tutorial):

1. `delta_kernel`: `delta`, fp32, one program per query block.
2. `_dkdv_kernel`: one program per key block owns its `dK` and `dV` and walks
   the query blocks that see it.
3. `_dq_kernel`: one program per query block owns its `dQ` and walks the key
   blocks it sees (the forward's loop bounds).

P is recomputed twice (once per pass) instead of accumulating `dQ` with
atomics across key-block programs: deterministic, and each pass is the plain
loop of the forward.

Conventions are the forward's (see `flash_fwd.py`): SDPA layout with any
strides, bottom-right causal alignment (query `i` sees key `j` iff
`j <= i + n_k - n_q`), base-2 scores (`exp(x) = exp2(x * log2(e))`; the
forward stores a natural-log `lse`, converted here once per row), fp32
accumulation, and `DOT_FP32` under the interpreter. Rows that see no key
(causal with `n_q > n_k`) have output 0 and lse -inf; the causal mask hides
all their pairs, and the backward also reads their lse as +inf, so their P is
exactly 0 and finite: every gradient through them is 0, never NaN.

Each pass, like the forward, splits its loop into the blocks that straddle
the causal diagonal (element mask, `MASKED=True`) and the blocks every row
fully sees (no mask). Bounds along the looped axis are checked by masked
loads in both: a padded query row has lse +inf (P = 0) and dO = 0, a padded
key is masked to P = 0 in the dQ pass (the only pass that sums over keys).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from methods.kernels.common import (
    LOG2E,
    check_attention_inputs,
    dot_fp32,
    head_offsets,
    interpreting,
    load_rows,
    store_rows,
    tile_dot,
)
from methods.kernels.flash_fwd import LaunchConfig, choose_config, flash_attention_forward

__all__ = [
    "FlashAttentionFunction",
    "choose_backward_config",
    "delta_kernel",
    "dkdv_tile",
    "dq_tile",
    "flash_attention",
    "flash_attention_backward",
    "row_stats",
]


# --- device side ------------------------------------------------------------------------------------------------------


@triton.jit
def row_stats(lse_base, delta_base, offs_m, row_ok):
    """`(lse2, delta)` of the rows `offs_m`: the base-2 log-sum-exp and `rowsum(dO * O)`.

    lse2 is +inf for rows past `n_q` and for rows that saw no key (lse -inf), so
    `exp2(score - lse2)` is exactly 0 there before any element mask: P stays finite
    everywhere (an lse of -inf would make it +inf, one `* 0` away from a NaN), and
    those rows contribute nothing even in blocks that take no mask.
    """
    lse = tl.load(lse_base + offs_m, mask=row_ok, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)  # * log2(e)
    delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
    return lse2, delta


@triton.jit
def dkdv_tile(dk, dv, k, v, q, do, lse2, delta, keep_t, qk_scale, MASKED: tl.constexpr, DOT_FP32: tl.constexpr):
    """One (key block x query block) step of the dK/dV pass: P^T recomputed from the lse, folded into `(dk, dv)`.

    Shared with the block-sparse backward (`block_sparse_bwd.py`), which differs only in which query blocks it
    visits and in its element mask. `keep_t` (keys x queries) is read only when MASKED: P is zeroed where it is
    False (tl.where selects, so a hidden pair's exp2 overflowing to inf never reaches the sums).
    """
    p_t = tl.math.exp2(tile_dot(k, tl.trans(q), DOT_FP32) * qk_scale - lse2[None, :])
    if MASKED:
        p_t = tl.where(keep_t, p_t, 0.0)
    # As FA2: P and dS are cast to the inputs' 16-bit type for the tensor cores (a no-op in DOT_FP32).
    dv += tile_dot(p_t.to(do.dtype), do, DOT_FP32)
    dp_t = tile_dot(v, tl.trans(do), DOT_FP32)
    ds_t = p_t * (dp_t - delta[None, :])
    dk += tile_dot(ds_t.to(q.dtype), q, DOT_FP32)
    return dk, dv


@triton.jit
def dq_tile(dq, q, do, lse2, delta, k, v, keep, qk_scale, MASKED: tl.constexpr, DOT_FP32: tl.constexpr):
    """One (query block x key block) step of the dQ pass: P recomputed from the lse, dS folded into `dq`.

    Shared with the block-sparse backward; `keep` (queries x keys) is read only when MASKED.
    """
    p = tl.math.exp2(tile_dot(q, tl.trans(k), DOT_FP32) * qk_scale - lse2[:, None])
    if MASKED:
        p = tl.where(keep, p, 0.0)
    dp = tile_dot(do, tl.trans(v), DOT_FP32)
    ds = p * (dp - delta[:, None])
    dq += tile_dot(ds.to(k.dtype), k, DOT_FP32)
    return dq


@triton.jit
def key_block(
    k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd, start_n, n_k,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_FP32: tl.constexpr,
):  # fmt: skip
    """The key block a dK/dV program owns: its offsets, masks, and K, V tiles (dense and block-sparse alike).

    Padded keys load as 0; their rows of dK, dV are computed but never stored.
    """
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    key_ok, d_ok = offs_n < n_k, offs_d < HEAD_DIM
    k = load_rows(k_base, offs_n, key_ok, stride_kn, offs_d, d_ok, stride_kd)
    v = load_rows(v_base, offs_n, key_ok, stride_vn, offs_d, d_ok, stride_vd)
    if DOT_FP32:
        k, v = k.to(tl.float32), v.to(tl.float32)
    return offs_n, offs_d, key_ok, d_ok, k, v


@triton.jit
def delta_kernel(
    Out, DO, Delta,
    stride_oz, stride_oh, stride_om, stride_od,
    stride_dz, stride_dh, stride_dm, stride_dd,
    n_heads, n_q,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """`delta = rowsum(dO * O)` in fp32 for one query block: grid `(cdiv(n_q, BLOCK_M), batch * heads)`.

    Delta is contiguous `(batch, heads, n_q)`, like the lse, so the passes address both with one offset.
    """
    off_bh, off_z, off_h = head_offsets(n_heads)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok, d_ok = offs_m < n_q, offs_d < HEAD_DIM
    o = load_rows(Out + off_z * stride_oz + off_h * stride_oh, offs_m, row_ok, stride_om, offs_d, d_ok, stride_od)
    do = load_rows(DO + off_z * stride_dz + off_h * stride_dh, offs_m, row_ok, stride_dm, offs_d, d_ok, stride_dd)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + off_bh.to(tl.int64) * n_q + offs_m, delta, mask=row_ok)


@triton.jit
def _dkdv_inner(
    dk, dv, k, v, q_base, do_base, lse_base, delta_base,
    stride_qm, stride_qd, stride_dm, stride_dd,
    offs_n, offs_d, n_q, offset, qk_scale, lo, hi,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, MASKED: tl.constexpr, DOT_FP32: tl.constexpr,
):  # fmt: skip
    """Fold query blocks `[lo, hi)` into one key block's `(dk, dv)`; the tiles are transposed (keys x queries).

    MASKED: the blocks straddling the causal diagonal, where P is zeroed for the
    (query, key) pairs the mask hides. Unmasked blocks are seen whole.
    """
    d_ok = offs_d < HEAD_DIM
    for start_m in range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < n_q
        q = load_rows(q_base, offs_m, row_ok, stride_qm, offs_d, d_ok, stride_qd)
        do = load_rows(do_base, offs_m, row_ok, stride_dm, offs_d, d_ok, stride_dd)
        if DOT_FP32:
            q, do = q.to(tl.float32), do.to(tl.float32)
        lse2, delta = row_stats(lse_base, delta_base, offs_m, row_ok)

        if MASKED:
            keep_t = offs_m[None, :] + offset >= offs_n[:, None]
        else:
            keep_t = 0  # not read
        dk, dv = dkdv_tile(dk, dv, k, v, q, do, lse2, delta, keep_t, qk_scale, MASKED, DOT_FP32)
    return dk, dv


@triton.jit
def _dkdv_kernel(
    Q, K, V, DO, Lse, Delta, DK, DV,
    stride_qz, stride_qh, stride_qm, stride_qd,
    stride_kz, stride_kh, stride_kn, stride_kd,
    stride_vz, stride_vh, stride_vn, stride_vd,
    stride_dz, stride_dh, stride_dm, stride_dd,
    stride_dkz, stride_dkh, stride_dkn, stride_dkd,
    stride_dvz, stride_dvh, stride_dvn, stride_dvd,
    n_heads, n_q, n_k, scale, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, DOT_FP32: tl.constexpr,
):  # fmt: skip
    """`dK`, `dV` of one key block of one (batch, head): grid `(cdiv(n_k, BLOCK_N), batch * heads)`."""
    off_bh, off_z, off_h = head_offsets(n_heads)
    q_base = Q + off_z * stride_qz + off_h * stride_qh
    do_base = DO + off_z * stride_dz + off_h * stride_dh
    lse_base = Lse + off_bh.to(tl.int64) * n_q
    delta_base = Delta + off_bh.to(tl.int64) * n_q

    start_n = tl.program_id(0) * BLOCK_N
    offs_n, offs_d, key_ok, d_ok, k, v = key_block(
        K + off_z * stride_kz + off_h * stride_kh, V + off_z * stride_vz + off_h * stride_vh,
        stride_kn, stride_kd, stride_vn, stride_vd, start_n, n_k, HEAD_DIM, BLOCK_N, BLOCK_D, DOT_FP32,
    )  # fmt: skip
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    offset = n_k - n_q  # query i sits at absolute position i + offset
    if CAUSAL:
        # Query i sees key j iff i >= j - offset: the block's first key is seen from query start_n - offset on,
        # its last from start_n + BLOCK_N - 1 - offset on; query blocks before the first see nothing of it.
        lo = tl.minimum(tl.maximum(start_n - offset, 0), n_q)
        lo = (lo // BLOCK_M) * BLOCK_M
        full_start = tl.minimum(tl.maximum(start_n + BLOCK_N - 1 - offset, 0), n_q)
        # Rounded up to a query block (operands >= 0, so truncating division is floor division).
        full_start = ((full_start + BLOCK_M - 1) // BLOCK_M) * BLOCK_M
    else:
        lo = 0
        full_start = 0

    dk, dv = _dkdv_inner(
        dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_qd, stride_dm, stride_dd,
        offs_n, offs_d, n_q, offset, qk_scale, lo, full_start,
        HEAD_DIM, BLOCK_M, True, DOT_FP32,
    )  # fmt: skip
    dk, dv = _dkdv_inner(
        dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_qd, stride_dm, stride_dd,
        offs_n, offs_d, n_q, offset, qk_scale, full_start, n_q,
        HEAD_DIM, BLOCK_M, False, DOT_FP32,
    )  # fmt: skip

    dk_base = DK + off_z * stride_dkz + off_h * stride_dkh
    dv_base = DV + off_z * stride_dvz + off_h * stride_dvh
    store_rows(dk_base, offs_n, key_ok, stride_dkn, offs_d, d_ok, stride_dkd, dk * scale)
    store_rows(dv_base, offs_n, key_ok, stride_dvn, offs_d, d_ok, stride_dvd, dv)


@triton.jit
def _dq_inner(
    dq, q, do, lse2, delta, k_base, v_base,
    stride_kn, stride_kd, stride_vn, stride_vd,
    offs_m, offs_d, n_k, offset, qk_scale, lo, hi,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
    DOT_FP32: tl.constexpr,
):  # fmt: skip
    """Fold key blocks `[lo, hi)` into one query block's `dq`.

    MASKED: the blocks straddling the causal diagonal or the end of the keys,
    where P is zeroed past `n_k` and (CAUSAL) for the pairs the mask hides.
    """
    d_ok = offs_d < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        key_ok = offs_n < n_k
        k = load_rows(k_base, offs_n, key_ok, stride_kn, offs_d, d_ok, stride_kd)
        v = load_rows(v_base, offs_n, key_ok, stride_vn, offs_d, d_ok, stride_vd)
        if DOT_FP32:
            k, v = k.to(tl.float32), v.to(tl.float32)

        if MASKED:
            keep = key_ok[None, :]
            if CAUSAL:
                keep = keep & (offs_m[:, None] + offset >= offs_n[None, :])
        else:
            keep = 0  # not read
        dq = dq_tile(dq, q, do, lse2, delta, k, v, keep, qk_scale, MASKED, DOT_FP32)
    return dq


@triton.jit
def _dq_kernel(
    Q, K, V, DO, Lse, Delta, DQ,
    stride_qz, stride_qh, stride_qm, stride_qd,
    stride_kz, stride_kh, stride_kn, stride_kd,
    stride_vz, stride_vh, stride_vn, stride_vd,
    stride_dz, stride_dh, stride_dm, stride_dd,
    stride_dqz, stride_dqh, stride_dqm, stride_dqd,
    n_heads, n_q, n_k, scale, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, DOT_FP32: tl.constexpr,
):  # fmt: skip
    """`dQ` of one query block of one (batch, head): grid `(cdiv(n_q, BLOCK_M), batch * heads)`."""
    off_bh, off_z, off_h = head_offsets(n_heads)
    k_base = K + off_z * stride_kz + off_h * stride_kh
    v_base = V + off_z * stride_vz + off_h * stride_vh

    m_start = tl.program_id(0) * BLOCK_M
    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok, d_ok = offs_m < n_q, offs_d < HEAD_DIM
    q = load_rows(Q + off_z * stride_qz + off_h * stride_qh, offs_m, row_ok, stride_qm, offs_d, d_ok, stride_qd)
    do = load_rows(DO + off_z * stride_dz + off_h * stride_dh, offs_m, row_ok, stride_dm, offs_d, d_ok, stride_dd)
    if DOT_FP32:
        q, do = q.to(tl.float32), do.to(tl.float32)
    lse2, delta = row_stats(Lse + off_bh.to(tl.int64) * n_q, Delta + off_bh.to(tl.int64) * n_q, offs_m, row_ok)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # The forward's loop bounds (see `flash_fwd._flash_fwd_kernel`).
    offset = n_k - n_q
    if CAUSAL:
        full_end = tl.minimum(tl.maximum(m_start + offset + 1, 0), n_k)
        hi = tl.minimum(tl.maximum(m_start + BLOCK_M + offset, 0), n_k)
    else:
        full_end = n_k
        hi = n_k
    full_end = (full_end // BLOCK_N) * BLOCK_N

    dq = _dq_inner(
        dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
        offs_m, offs_d, n_k, offset, qk_scale, 0, full_end,
        HEAD_DIM, BLOCK_N, False, CAUSAL, DOT_FP32,
    )  # fmt: skip
    dq = _dq_inner(
        dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
        offs_m, offs_d, n_k, offset, qk_scale, full_end, hi,
        HEAD_DIM, BLOCK_N, True, CAUSAL, DOT_FP32,
    )  # fmt: skip
    dq_base = DQ + off_z * stride_dqz + off_h * stride_dqh
    store_rows(dq_base, offs_m, row_ok, stride_dqm, offs_d, d_ok, stride_dqd, dq * scale)


# --- host side --------------------------------------------------------------------------------------------------------


def choose_backward_config(n_q: int, n_k: int, head_dim: int, dtype: torch.dtype) -> LaunchConfig:
    """The forward's tiles (`flash_fwd.choose_config`), shrunk to 32 x 32 on the GPU from a padded head dim of 128
    for fp32 and above 128 for 16-bit inputs.

    A backward program keeps twice the forward's state (two fp32 accumulators
    plus two resident tiles, e.g. K, V, dK, dV) and streams two tiles per step
    (Q and dO), so the tile that fits the forward's registers and shared memory
    can overflow them here. Under the interpreter tiles stay large: fewer,
    bigger ops are what make it fast.
    """
    cfg = choose_config(n_q, n_k, head_dim, dtype)
    wide = cfg.block_d > 128 or (cfg.block_d == 128 and dtype == torch.float32)
    if wide and not interpreting():
        return LaunchConfig(min(cfg.block_m, 32), min(cfg.block_n, 32), cfg.block_d, cfg.num_warps, num_stages=1)
    return cfg


def flash_attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    causal: bool = False,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(dq, dk, dv)` of `out = flash_attention_forward(q, k, v, causal, scale)` for the output gradient `grad_out`.

    Args:
        grad_out, out: `(batch, heads, n_q, head_dim)`, any strides; `out` is the forward's output.
        q, k, v, causal, scale: the forward's arguments.
        lse: the forward's `(batch, heads, n_q)` natural log-sum-exp (`return_lse=True`), float32.

    Returns:
        Gradients shaped and typed like `q`, `k`, `v` (contiguous). Rows that see no key get 0.
    """
    check_attention_inputs(q, k, v)
    for name, t in (("grad_out", grad_out), ("out", out)):
        if t.shape != q.shape:
            raise ValueError(f"{name} must be shaped like q {tuple(q.shape)}, got {tuple(t.shape)}")
    batch, heads, n_q, head_dim = q.shape
    n_k = k.shape[2]
    if lse.shape != (batch, heads, n_q):
        raise ValueError(f"lse must be (batch, heads, n_q) = {(batch, heads, n_q)}, got {tuple(lse.shape)}")
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    if q.numel() == 0 or n_k == 0:  # no (query, key) pair at all: every gradient is 0
        return dq.zero_(), dk.zero_(), dv.zero_()

    lse = lse.to(torch.float32).contiguous()  # the passes address lse and delta with one contiguous offset
    delta = torch.empty_like(lse)
    cfg = choose_backward_config(n_q, n_k, head_dim, q.dtype)
    launch = dict(HEAD_DIM=head_dim, BLOCK_M=cfg.block_m, BLOCK_D=cfg.block_d, num_warps=cfg.num_warps)
    q_grid = (triton.cdiv(n_q, cfg.block_m), batch * heads)
    delta_kernel[q_grid](out, grad_out, delta, *out.stride(), *grad_out.stride(), heads, n_q, **launch)
    passes = dict(
        BLOCK_N=cfg.block_n, CAUSAL=bool(causal), DOT_FP32=dot_fp32(q.dtype), num_stages=cfg.num_stages, **launch
    )
    _dkdv_kernel[(triton.cdiv(n_k, cfg.block_n), batch * heads)](
        q, k, v, grad_out, lse, delta, dk, dv,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dk.stride(), *dv.stride(),
        heads, n_q, n_k, scale, scale * LOG2E,
        **passes,
    )  # fmt: skip
    _dq_kernel[q_grid](
        q, k, v, grad_out, lse, delta, dq,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dq.stride(),
        heads, n_q, n_k, scale, scale * LOG2E,
        **passes,
    )  # fmt: skip
    return dq, dk, dv


class FlashAttentionFunction(torch.autograd.Function):
    """Autograd node for the Triton kernels: the forward saves `(q, k, v, out, lse)`, the backward recomputes P.

    Differentiable once (`once_differentiable`): the backward kernels are not themselves differentiated.
    """

    @staticmethod
    def forward(ctx, q, k, v, causal: bool, scale: float | None):
        out, lse = flash_attention_forward(q, k, v, causal=causal, scale=scale, return_lse=True)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.scale = causal, scale
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = flash_attention_backward(grad_out, q, k, v, out, lse, causal=ctx.causal, scale=ctx.scale)
        return dq, dk, dv, None, None


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale [+ causal mask]) v, differentiable: `flash_attention_forward` with a Triton backward.

    When no gradient is needed (torch.no_grad, or no input requires grad) it
    is exactly `flash_attention_forward`: no lse is stored and nothing is
    saved, so forward-only timings are the forward kernel's.
    """
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return FlashAttentionFunction.apply(q, k, v, causal, scale)
    return flash_attention_forward(q, k, v, causal=causal, scale=scale)
