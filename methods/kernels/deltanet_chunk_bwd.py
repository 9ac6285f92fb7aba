"""DeltaNet's chunkwise backward in Triton, and the autograd wiring that pairs it with `deltanet_chunk.py`.

The forward splits into the WY/UT factors (`wy_factors`, PyTorch, parallel over chunks) and the sequential
chunk loop (Triton). The backward splits the same way: `deltanet_chunk` computes W, U under autograd, so
the gradients of the triangular solve reach k, v and beta through PyTorch; only the loop, a function of
(q, k, W, U), gets a hand-written backward (`DeltaNetChunkLoop`). For chunk i, with S_i the state before it,
`U'_i = U_i - W_i S_i` and `dS_{i+1}` the gradient flowing into the state after it::

    dU'_i = tril(Q_i K_i^T)^T dO_i + K_i dS_{i+1}          (= dU_i)
    dQ_i  = dO_i S_i^T + tril(dO_i U'_i^T) K_i
    dK_i  = tril(dO_i U'_i^T)^T Q_i + U'_i dS_{i+1}^T
    dW_i  = -dU'_i S_i^T
    dS_i  = dS_{i+1} + Q_i^T dO_i - W_i^T dU'_i

(from `O_i = Q_i S_i + tril(Q_i K_i^T) U'_i` and `S_{i+1} = S_i + K_i^T U'_i`; dS after the last chunk is 0).
One program per (batch, head, value block) walks the chunks backwards holding `dS` in registers, the
forward's loop run in reverse.

**Per-chunk states: stored by the forward, not recomputed.** The reverse walk needs every S_i. fla
recomputes them in the backward (a forward-like pass that writes all states, then the reverse pass) so
that a deep model does not keep them alive between its forward and backward. Here the op is the model: the
states are needed anyway, and a recompute would add a second *sequential* walk over the chunks, the part
that is latency-bound and cannot use more programs than batch x heads x value blocks. So when a gradient is
needed the forward kernel also stores S_i (its `STORE_STATES` flag; `n_chunks x d_k x d_v` fp32 per head,
as much memory as one fp32 copy of q at d_v = chunk size), and the backward recomputes only
`U'_i = U_i - W_i S_i`, one product per chunk, instead of keeping another `N x d_v` tensor.

**Value blocks: partial sums in PyTorch.** S's value columns evolve independently, and so do dS's, dU' and
dU, so the grid splits d_v as the forward does (BLOCK_V, `choose_backward_config`). dQ, dK and dW sum over
the value dim: each value block stores its fp32 partial and PyTorch adds them (nothing to add with one
block, the interpreter's case). Deterministic, with no atomics; the alternative, the whole d_v per program,
would put two d_k x d_v fp32 tiles (S_i and dS) in one program's registers.

Conventions are those of the forward: SDPA layout with any strides, fp32 accumulation, `DOT_FP32` for fp32
and under the interpreter (where `tl.dot` on 16-bit tiles is silently wrong), 16-bit tensor-core operands
otherwise (states cast for each product, accumulated in fp32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from methods.kernels.common import (
    SUPPORTED_DTYPES,
    check_4d,
    dot_fp32,
    dot_tile,
    head_offsets,
    interpreting,
    is_dot_tile,
    load_rows,
    require_cuda,
    store_rows,
    tile_dot,
)
from methods.kernels.deltanet_chunk import (
    MAX_HEAD_DIM,
    LaunchConfig,
    _check_inputs,
    deltanet_chunk_forward,
    launch_chunk_loop,
)
from methods.kernels.wy import wy_factors

__all__ = [
    "DeltaNetChunkLoop",
    "choose_backward_config",
    "deltanet_chunk",
    "deltanet_chunk_loop",
    "deltanet_chunk_loop_backward",
]


# Configurations `bench.kernel_fit` measured over its spill budget that no tile choice here fixed: reported by
# the check, not failed. On sm_80 only: the same tiles spill under 1 KB on sm_90.
GPU_FIT_KNOWN = [
    (
        "_deltanet_chunk_bwd_kernel",
        80,
        {"BLOCK_K": 256, "DOT_FP32": False},
        "16-bit d_k 256 on sm_80 spills 20-31 KB at every value block and warp count tried (16/32, 4/8/16)",
    ),
]


# --- device side ------------------------------------------------------------------------------------------------------


@triton.jit
def _mm(a, b, like, DOT_FP32: tl.constexpr):
    """`a @ b` accumulated in fp32: exact fp32 (ieee) with DOT_FP32, else both operands in `like`'s 16-bit dtype.

    The backward multiplies fp32 intermediates (U', dU', S, dS) with loaded tiles; the cast makes every product
    the forward's recipe, tensor-core operands in the input dtype, without a branch at every call site.
    """
    if DOT_FP32:
        c = tile_dot(a.to(tl.float32), b.to(tl.float32), DOT_FP32)
    else:
        c = tile_dot(a.to(like.dtype), b.to(like.dtype), DOT_FP32)
    return c


@triton.jit
def _deltanet_chunk_bwd_kernel(
    Q, K, W, U, DO, States, DQ, DK, DW, DU,
    stride_qz, stride_qh, stride_qn, stride_qd,
    stride_kz, stride_kh, stride_kn, stride_kd,
    stride_wz, stride_wh, stride_wn, stride_wd,
    stride_uz, stride_uh, stride_un, stride_ud,
    stride_doz, stride_doh, stride_don, stride_dod,
    stride_duz, stride_duh, stride_dun, stride_dud,
    stride_pv, stride_pz, stride_ph, stride_pn, stride_pd,
    n_heads, n_tokens, n_chunks,
    D_K: tl.constexpr, D_V: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_V: tl.constexpr, DOT_FP32: tl.constexpr,
):  # fmt: skip
    """Grid `(cdiv(d_v, BLOCK_V), batch * heads)`, chunks walked last to first.

    States: the forward's contiguous fp32 `(B, H, n_chunks, d_k, d_v)`. DQ, DK, DW: fp32 partials, one
    `(B, H, N, d_k)` slab per value block (stride_pv apart), all with the same strides. DU: complete.
    """
    pid_v = tl.program_id(0)
    off_bh, off_z, off_h = head_offsets(n_heads)
    q_base = Q + off_z * stride_qz + off_h * stride_qh
    k_base = K + off_z * stride_kz + off_h * stride_kh
    w_base = W + off_z * stride_wz + off_h * stride_wh
    u_base = U + off_z * stride_uz + off_h * stride_uh
    do_base = DO + off_z * stride_doz + off_h * stride_doh
    du_base = DU + off_z * stride_duz + off_h * stride_duh
    part = pid_v.to(tl.int64) * stride_pv + off_z * stride_pz + off_h * stride_ph
    dq_base, dk_base, dw_base = DQ + part, DK + part, DW + part

    offs_c = tl.arange(0, BLOCK_C)
    offs_k = tl.arange(0, BLOCK_K)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    # Padded head-dim columns load as 0, so they stay 0 in S, dS and every product; they are never stored.
    k_ok = offs_k < D_K
    v_ok = offs_v < D_V
    s_mask = k_ok[:, None] & v_ok[None, :]
    # The last chunk's state; the walk steps back one d_k x d_v state per chunk (int64 pointer arithmetic).
    s_ptrs = States + (off_bh.to(tl.int64) * n_chunks + n_chunks - 1) * D_K * D_V
    s_ptrs += offs_k[:, None] * D_V + offs_v[None, :]
    causal = offs_c[:, None] >= offs_c[None, :]  # the forward's mask: (query row, key column), inclusive
    ds = tl.zeros([BLOCK_K, BLOCK_V], dtype=tl.float32)  # nothing flows into the state after the last chunk

    for j in range(0, n_chunks):
        rows = (n_chunks - 1 - j) * BLOCK_C + offs_c
        row_ok = rows < n_tokens  # padded tokens load as 0: they add nothing and their rows are not stored
        q = load_rows(q_base, rows, row_ok, stride_qn, offs_k, k_ok, stride_qd)
        k = load_rows(k_base, rows, row_ok, stride_kn, offs_k, k_ok, stride_kd)
        w = load_rows(w_base, rows, row_ok, stride_wn, offs_k, k_ok, stride_wd)
        u = load_rows(u_base, rows, row_ok, stride_un, offs_v, v_ok, stride_ud)
        do = load_rows(do_base, rows, row_ok, stride_don, offs_v, v_ok, stride_dod)
        s = tl.load(s_ptrs, mask=s_mask, other=0.0)
        s_ptrs -= D_K * D_V
        if DOT_FP32:
            q, k, w, do = q.to(tl.float32), k.to(tl.float32), w.to(tl.float32), do.to(tl.float32)

        u_new = u.to(tl.float32) - _mm(w, s, q, DOT_FP32)  # recomputed from the stored state, as the forward
        qk = tl.where(causal, _mm(q, tl.trans(k), q, DOT_FP32), 0.0)
        d_qk = tl.where(causal, _mm(do, tl.trans(u_new), q, DOT_FP32), 0.0)  # gradient of tril(Q K^T)
        du_new = _mm(tl.trans(qk), do, q, DOT_FP32) + _mm(k, ds, q, DOT_FP32)
        dq = _mm(do, tl.trans(s), q, DOT_FP32) + _mm(d_qk, k, q, DOT_FP32)
        dk = _mm(tl.trans(d_qk), q, q, DOT_FP32) + _mm(u_new, tl.trans(ds), q, DOT_FP32)
        dw = -_mm(du_new, tl.trans(s), q, DOT_FP32)
        ds += _mm(tl.trans(q), do, q, DOT_FP32) - _mm(tl.trans(w), du_new, q, DOT_FP32)

        store_rows(du_base, rows, row_ok, stride_dun, offs_v, v_ok, stride_dud, du_new)
        store_rows(dq_base, rows, row_ok, stride_pn, offs_k, k_ok, stride_pd, dq)
        store_rows(dk_base, rows, row_ok, stride_pn, offs_k, k_ok, stride_pd, dk)
        store_rows(dw_base, rows, row_ok, stride_pn, offs_k, k_ok, stride_pd, dw)


# --- host side --------------------------------------------------------------------------------------------------------


def choose_backward_config(d_k: int, d_v: int, chunk_size: int, dtype: torch.dtype) -> LaunchConfig:
    """Whole (padded) head dims under the interpreter; on the GPU a narrow value block and 8 warps.

    A reverse-walk program holds S_i and dS (d_k x BLOCK_V fp32 each) and the chunk's C x C tiles besides the
    loaded tiles, about twice the forward's live state. d_k is never split (`tril(Q K^T)` needs all of it), so
    the value block is what shrinks. Compiled for sm_80 and sm_90 (`bench.kernel_fit`): 16-bit inputs spilled
    14 KB at d_k 64 with 64 columns and 4 warps, under 0.4 KB with 32 columns and 8 warps, and at d_k 128
    2.6 KB with 32 columns, 0.4 KB with 16; fp32 inputs (exact `ieee` products on the FMA units, operands in
    registers) spilled 80 KB at 64 columns and about 1.5 KB at 16. One pipeline stage: the loop's loads feed
    a sequential dependency chain through dS. Under the interpreter whole dims mean one program per head and
    no partial sums: fewer, bigger ops are what make it fast.
    """
    block_k, block_v = dot_tile(d_k), dot_tile(d_v)
    if interpreting():
        return LaunchConfig(block_k, block_v, num_warps=4, num_stages=1)
    narrow = dtype == torch.float32 or block_k >= 128
    return LaunchConfig(block_k, min(block_v, 16 if narrow else 32), num_warps=8, num_stages=1)


def _check_loop_inputs(q, k, w, u, chunk_size: int) -> None:
    """One-line ValueErrors for loop inputs the kernels cannot take, before any launch."""
    check_4d({"q": q, "k": k, "w": w, "u": u})
    if not (q.shape == k.shape == w.shape and q.shape[:3] == u.shape[:3]):
        raise ValueError(
            f"q, k, w must be (batch, heads, seq, d_k) and u (batch, heads, seq, d_v): q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, w {tuple(w.shape)}, u {tuple(u.shape)}"
        )
    for name, dim in (("d_k", k.shape[3]), ("d_v", u.shape[3])):
        if not 1 <= dim <= MAX_HEAD_DIM:
            raise ValueError(f"{name} {dim} is not supported; supported range is 1 to {MAX_HEAD_DIM}")
    if not is_dot_tile(chunk_size):
        raise ValueError(f"chunk_size must be a power of two >= 16 (tl.dot's smallest tile), got {chunk_size}")
    for name, t in (("q", q), ("k", k), ("w", w), ("u", u)):
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name} has dtype {t.dtype}; supported: float32, float16, bfloat16")
        if t.device != q.device:
            raise ValueError(f"device mismatch: q on {q.device}, {name} on {t.device}")
    require_cuda(q.device)


def _loop_forward(q, k, w, u, chunk_size: int, out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """`(out, states)`: the forward kernel on given W, U, storing the state before every chunk for the backward."""
    batch, heads, n, d_k = k.shape
    out = torch.empty(batch, heads, n, u.shape[3], dtype=out_dtype, device=q.device)
    states = torch.empty(
        batch, heads, triton.cdiv(n, chunk_size), d_k, u.shape[3], dtype=torch.float32, device=q.device
    )
    if n:
        launch_chunk_loop(q, k, w, u, out, chunk_size, states=states)
    return out, states


def deltanet_chunk_loop_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    w: torch.Tensor,
    u: torch.Tensor,
    states: torch.Tensor,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(dq, dk, dw, du)` in fp32 of the chunk loop `out = loop(q, k, w, u)` for the output gradient `grad_out`.

    Args:
        grad_out: `(B, H, N, d_v)`, any strides. q, k, w: `(B, H, N, d_k)`, u: `(B, H, N, d_v)`, in the
            operand dtype the forward used. states: the forward's `(B, H, n_chunks, d_k, d_v)` fp32 states
            before each chunk (`_loop_forward`).
    """
    batch, heads, n, d_k = k.shape
    d_v = u.shape[3]
    if n == 0:
        return tuple(torch.zeros(t.shape, dtype=torch.float32, device=t.device) for t in (q, k, w, u))
    cfg = choose_backward_config(d_k, d_v, chunk_size, q.dtype)
    n_blocks = triton.cdiv(d_v, cfg.block_v)
    # dq, dk, dw partials of every value block; dU is complete in each block's columns.
    parts = torch.empty(3, n_blocks, batch, heads, n, d_k, dtype=torch.float32, device=q.device)
    du = torch.empty(batch, heads, n, d_v, dtype=torch.float32, device=q.device)
    _deltanet_chunk_bwd_kernel[(n_blocks, batch * heads)](
        q, k, w, u, grad_out, states.contiguous(), parts[0], parts[1], parts[2], du,
        *q.stride(), *k.stride(), *w.stride(), *u.stride(), *grad_out.stride(), *du.stride(), *parts[0].stride(),
        heads, n, triton.cdiv(n, chunk_size),
        D_K=d_k, D_V=d_v, BLOCK_C=chunk_size, BLOCK_K=cfg.block_k, BLOCK_V=cfg.block_v,
        DOT_FP32=dot_fp32(q.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    dq, dk, dw = parts.sum(1) if n_blocks > 1 else parts[:, 0]
    return dq, dk, dw, du


class DeltaNetChunkLoop(torch.autograd.Function):
    """Autograd node of the chunk loop on (q, k, W, U): the forward stores the per-chunk states, the backward
    walks the chunks in reverse. Gradients come back in each input's dtype.

    Differentiable once (`once_differentiable`): the backward kernel is not itself differentiated.
    """

    @staticmethod
    def forward(ctx, q, k, w, u, chunk_size: int, out_dtype: torch.dtype):
        op_dtype = torch.float32 if dot_fp32(out_dtype) else out_dtype
        ops = [t.to(op_dtype) for t in (q, k, w, u)]
        out, states = _loop_forward(*ops, chunk_size, out_dtype)
        ctx.save_for_backward(*ops, states)
        ctx.chunk_size = chunk_size
        ctx.dtypes = tuple(t.dtype for t in (q, k, w, u))
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, k, w, u, states = ctx.saved_tensors
        grads = deltanet_chunk_loop_backward(grad_out, q, k, w, u, states, ctx.chunk_size)
        return (*(g.to(dtype) for g, dtype in zip(grads, ctx.dtypes, strict=True)), None, None)


def deltanet_chunk_loop(
    q: torch.Tensor,
    k: torch.Tensor,
    w: torch.Tensor,
    u: torch.Tensor,
    chunk_size: int = 64,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The chunk loop alone, differentiable in q, k, W, U: `U' = U_i - W_i S; O_i = Q_i S + tril(Q_i K_i^T) U';
    S += K_i^T U'` from S = 0.

    Args:
        q, k, w: `(B, H, N, d_k)`; u: `(B, H, N, d_v)`; any strides, any supported dtypes (the WY factors
            are fp32 when q, k are 16-bit). Rows of a last partial chunk are taken as padded with zeros.
        chunk_size: tokens per chunk, a power of two >= 16.
        out_dtype: the output's dtype (q's when None); 16-bit makes the GPU path use tensor cores.
    """
    _check_loop_inputs(q, k, w, u, chunk_size)
    return DeltaNetChunkLoop.apply(q, k, w, u, chunk_size, q.dtype if out_dtype is None else out_dtype)


def deltanet_chunk(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    chunk_size: int = 64,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Delta-rule outputs for prepared inputs, differentiable in q, k, v and beta.

    The WY factors come from `wy_factors` under autograd (fp32), so k, v and beta get the triangular solve's
    gradients from PyTorch, and k its loop gradient from the kernel as well. Without a gradient to compute
    (torch.no_grad, or no input requiring one) this is exactly `deltanet_chunk_forward`: no state is stored,
    so forward-only timings are the forward kernel's.

    Args: as `deltanet_chunk_forward` (no initial or final state).
    """
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, beta))):
        return deltanet_chunk_forward(q, k, v, beta, chunk_size, out_dtype=out_dtype)[0]
    _check_inputs(q, k, v, beta, chunk_size, None)
    batch, heads, n, d_k = k.shape
    _, w, u = wy_factors(k.float(), v.float(), beta.float(), chunk_size)
    # Whole chunks -> tokens; the padded rows are 0 and the loop does not read them.
    w = w.reshape(batch, heads, -1, d_k)[:, :, :n]
    u = u.reshape(batch, heads, -1, v.shape[3])[:, :, :n]
    return DeltaNetChunkLoop.apply(q, k, w, u, chunk_size, q.dtype if out_dtype is None else out_dtype)
