"""DeltaNet's chunkwise forward in Triton: the state recurrence and the outputs, one program per (batch, head).

The split between PyTorch and Triton follows the two kinds of work in the WY/UT form (see
`methods/deltanet.py` for the math):

* **Parallel over chunks, in PyTorch** (`methods.kernels.wy.wy_factors`): per chunk of C tokens,
  `A = I + tril(diag(beta) K K^T, -1)` and one batched triangular solve for `W = A^{-1} diag(beta) K` and
  `U = A^{-1} diag(beta) V`. No chunk depends on another, so this is a handful of large batched ops
  (cuBLAS on the GPU); writing an in-kernel forward substitution would not change the asymptotics.
* **Sequential over chunks, in Triton** (`_deltanet_chunk_fwd_kernel`): one program owns one (batch, head)
  and one block of value columns, keeps the state block `S` (d_k x BLOCK_V, fp32) in registers and walks
  the chunks in order::

      U' = U_i - W_i S                  corrected values (what the incoming state does not yet return)
      O_i = Q_i S + tril(Q_i K_i^T) U'  inter-chunk part through the state + intra-chunk causal part
      S  = S + K_i^T U'                 the state after the chunk

  The state never leaves the chip between chunks, and S's value columns evolve independently
  (`S[:, j]` only reads `U[:, j]`), which is why the grid may split d_v into blocks. This fuses fla's
  `chunk_fwd_h` and `chunk_fwd_o` kernels into one pass; it gives up fla's parallelism over chunks for the
  output (fla stores every chunk's state to HBM first), which matters only when batch x heads is too small
  to fill the GPU.

Conventions are those of `flash_fwd.py`: SDPA layout, any strides for q/k/out, fp32 accumulation, and
`DOT_FP32` (every tile upcast, `input_precision="ieee"`) for fp32 inputs and under Triton's interpreter, where
`tl.dot` on 16-bit tiles is silently wrong. On the GPU, 16-bit inputs feed the tensor cores in their own
dtype (q, k, W, U are cast to it; S is cast for each product and accumulated in fp32), as fla does.

The backward is `deltanet_chunk_bwd.py`; for it, this kernel can also store the state before every chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

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
)
from methods.kernels.wy import wy_factors

__all__ = [
    "MAX_FP32_HEAD_DIM_ON_GPU",
    "MAX_HEAD_DIM",
    "LaunchConfig",
    "choose_config",
    "deltanet_chunk_forward",
    "launch_chunk_loop",
]

MAX_HEAD_DIM = 256


@triton.jit
def _deltanet_chunk_fwd_kernel(
    Q, K, W, U, Out, S0, ST,
    stride_qz, stride_qh, stride_qn, stride_qd,
    stride_kz, stride_kh, stride_kn, stride_kd,
    stride_wz, stride_wh, stride_wn, stride_wd,
    stride_uz, stride_uh, stride_un, stride_ud,
    stride_oz, stride_oh, stride_on, stride_od,
    n_heads, n_tokens, n_chunks,
    D_K: tl.constexpr, D_V: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_V: tl.constexpr, USE_INITIAL_STATE: tl.constexpr, STORE_FINAL_STATE: tl.constexpr,
    DOT_FP32: tl.constexpr,
    States=None, STORE_STATES: tl.constexpr = False,
):  # fmt: skip
    """Grid `(cdiv(d_v, BLOCK_V), batch * heads)`; states S0/ST are contiguous fp32 `(B, H, d_k, d_v)`.

    STORE_STATES (the differentiable entry in `deltanet_chunk_bwd.py`): also write the state *before* each
    chunk to `States`, contiguous fp32 `(B, H, n_chunks, d_k, d_v)`, for the backward's reverse walk.
    """
    pid_v = tl.program_id(0)
    off_bh, off_z, off_h = head_offsets(n_heads)
    q_base = Q + off_z * stride_qz + off_h * stride_qh
    k_base = K + off_z * stride_kz + off_h * stride_kh
    w_base = W + off_z * stride_wz + off_h * stride_wh
    u_base = U + off_z * stride_uz + off_h * stride_uh
    o_base = Out + off_z * stride_oz + off_h * stride_oh

    offs_c = tl.arange(0, BLOCK_C)
    offs_k = tl.arange(0, BLOCK_K)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    # BLOCK_K / BLOCK_V are the head dims rounded up to powers of two; the pad is loaded as 0 and never stored.
    k_ok = offs_k < D_K
    v_ok = offs_v < D_V
    s_mask = k_ok[:, None] & v_ok[None, :]
    s_offs = off_bh.to(tl.int64) * D_K * D_V + offs_k[:, None] * D_V + offs_v[None, :]
    if USE_INITIAL_STATE:
        s = tl.load(S0 + s_offs, mask=s_mask, other=0.0).to(tl.float32)
    else:
        s = tl.zeros([BLOCK_K, BLOCK_V], dtype=tl.float32)
    causal = offs_c[:, None] >= offs_c[None, :]  # inclusive: a token's output reads its own update

    for i in range(0, n_chunks):
        if STORE_STATES:  # s_offs already holds off_bh * D_K * D_V: this is States[off_bh, i] + the tile
            tl.store(States + (off_bh.to(tl.int64) * (n_chunks - 1) + i) * D_K * D_V + s_offs, s, mask=s_mask)
        rows = i * BLOCK_C + offs_c
        row_ok = rows < n_tokens
        q = load_rows(q_base, rows, row_ok, stride_qn, offs_k, k_ok, stride_qd)
        k = load_rows(k_base, rows, row_ok, stride_kn, offs_k, k_ok, stride_kd)
        w = load_rows(w_base, rows, row_ok, stride_wn, offs_k, k_ok, stride_wd)
        u = load_rows(u_base, rows, row_ok, stride_un, offs_v, v_ok, stride_ud)
        if DOT_FP32:
            q = q.to(tl.float32)
            k = k.to(tl.float32)
            w = w.to(tl.float32)
            u_new = u.to(tl.float32) - tl.dot(w, s, input_precision="ieee")
            qk = tl.where(causal, tl.dot(q, tl.trans(k), input_precision="ieee"), 0.0)
            o = tl.dot(q, s, input_precision="ieee")
            o = tl.dot(qk, u_new, o, input_precision="ieee")
            s = tl.dot(tl.trans(k), u_new, s, input_precision="ieee")
        else:
            # Tensor-core operands in the input dtype, every accumulation in fp32 (fla's precision recipe).
            u_new = u.to(tl.float32) - tl.dot(w, s.to(w.dtype))
            qk = tl.where(causal, tl.dot(q, tl.trans(k)), 0.0)
            o = tl.dot(q, s.to(q.dtype))
            o = tl.dot(qk.to(q.dtype), u_new.to(q.dtype), o)
            s = tl.dot(tl.trans(k), u_new.to(k.dtype), s)
        store_rows(o_base, rows, row_ok, stride_on, offs_v, v_ok, stride_od, o)

    if STORE_FINAL_STATE:
        tl.store(ST + s_offs, s, mask=s_mask)


@dataclass(frozen=True)
class LaunchConfig:
    """Tiles and launch parameters of a chunk kernel (`choose_config`; `deltanet_chunk_bwd.choose_backward_config`)."""

    block_k: int
    block_v: int
    num_warps: int
    num_stages: int


# Configurations `bench.kernel_fit` measured over its spill budget that no tile choice here fixed: reported by
# the check, not failed. sm_80 only: the same tiles fit sm_90.
GPU_FIT_KNOWN = [
    (
        "_deltanet_chunk_fwd_kernel",
        80,
        {"BLOCK_K": 256, "DOT_FP32": False},
        "16-bit d_k 256 on sm_80 spills 1.6-2.2 KB at every value block, warp and stage count tried (16/32, 4/8, 1/2)",
    ),
]
MAX_FP32_HEAD_DIM_ON_GPU = 128  # fp32 64 x d_k tiles at d_k 256 need 192-252 KB of shared memory


def choose_config(d_k: int, d_v: int, out_dtype: torch.dtype) -> LaunchConfig:
    """Whole head dims under the interpreter (fewest, largest ops); on the GPU a value block that fits.

    Sizes from compiling every configuration for sm_80 and sm_90 (`bench.kernel_fit`): the d_k x BLOCK_V fp32
    state stays in registers, so 16-bit inputs take 64 value columns (32 and one pipeline stage at a padded
    d_k of 256, where 64 columns needed 232 KB of shared memory, over an H100's 227 KB); fp32 inputs, whose
    exact `ieee` dots run on the FMA units with operands in registers, take 16 columns, 8 warps and one stage
    (64 columns spilled 2-24 KB), and stop at d_k 128: at 256 the chunk's fp32 q/k/W tiles alone overflow
    an A100's shared memory (a ValueError that says so, before any launch).
    """
    block_k, block_v = dot_tile(d_k), dot_tile(d_v)
    if interpreting():
        return LaunchConfig(block_k, block_v, num_warps=4, num_stages=2)
    if out_dtype == torch.float32:
        if d_k > MAX_FP32_HEAD_DIM_ON_GPU:
            raise ValueError(
                f"d_k {d_k} in float32 is not supported on the GPU (supported up to {MAX_FP32_HEAD_DIM_ON_GPU}: "
                "larger fp32 tiles exceed shared memory); use bfloat16/float16 or impl=reference"
            )
        return LaunchConfig(block_k, min(block_v, 16), num_warps=8, num_stages=1)
    if block_k > 128:
        return LaunchConfig(block_k, min(block_v, 32), num_warps=8, num_stages=1)
    return LaunchConfig(block_k, min(block_v, 64), num_warps=4 if block_k <= 64 else 8, num_stages=2)


def launch_chunk_loop(
    q: torch.Tensor,
    k: torch.Tensor,
    w: torch.Tensor,
    u: torch.Tensor,
    out: torch.Tensor,
    chunk_size: int,
    initial_state: torch.Tensor | None = None,
    final_state: torch.Tensor | None = None,
    states: torch.Tensor | None = None,
) -> None:
    """Run the chunk loop on prepared operands (q, k, W, U in the operand dtype) into `out`.

    `initial_state` / `final_state`: contiguous fp32 `(B, H, d_k, d_v)` read before the first chunk / written
    after the last. `states`: contiguous fp32 `(B, H, n_chunks, d_k, d_v)` receiving the state before every
    chunk, what the backward (`deltanet_chunk_bwd.py`) walks back through.
    """
    batch, heads, n, d_k = k.shape
    d_v = u.shape[3]
    cfg = choose_config(d_k, d_v, out.dtype)
    dummy = out  # never read or written when the matching flag is off
    _deltanet_chunk_fwd_kernel[(triton.cdiv(d_v, cfg.block_v), batch * heads)](
        q, k, w, u, out,
        initial_state if initial_state is not None else dummy, final_state if final_state is not None else dummy,
        *q.stride(), *k.stride(), *w.stride(), *u.stride(), *out.stride(),
        heads, n, triton.cdiv(n, chunk_size),
        D_K=d_k,
        D_V=d_v,
        BLOCK_C=chunk_size,
        BLOCK_K=cfg.block_k,
        BLOCK_V=cfg.block_v,
        USE_INITIAL_STATE=initial_state is not None,
        STORE_FINAL_STATE=final_state is not None,
        DOT_FP32=dot_fp32(out.dtype),
        States=states if states is not None else dummy,
        STORE_STATES=states is not None,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )  # fmt: skip


def _check_inputs(q, k, v, beta, chunk_size: int, initial_state) -> None:
    """One-line ValueErrors for what the kernel cannot compute, before launching it."""
    check_4d({"q": q, "k": k, "v": v})
    if not (q.shape[:3] == k.shape[:3] == v.shape[:3]):
        raise ValueError(
            f"q, k, v must share (batch, heads, seq): q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"q and k head dims differ: {q.shape[3]} vs {k.shape[3]}")
    if tuple(beta.shape) != tuple(k.shape[:3]):
        raise ValueError(f"beta must be (batch, heads, seq) = {tuple(k.shape[:3])}, got {tuple(beta.shape)}")
    for name, dim in (("d_k", k.shape[3]), ("d_v", v.shape[3])):
        if not 1 <= dim <= MAX_HEAD_DIM:
            raise ValueError(f"{name} {dim} is not supported; supported range is 1 to {MAX_HEAD_DIM}")
    if not is_dot_tile(chunk_size):
        raise ValueError(f"chunk_size must be a power of two >= 16 (tl.dot's smallest tile), got {chunk_size}")
    if q.dtype not in SUPPORTED_DTYPES or not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one of float32/float16/bfloat16: got {q.dtype}, {k.dtype}, {v.dtype}")
    if initial_state is not None and tuple(initial_state.shape) != (*k.shape[:2], k.shape[3], v.shape[3]):
        raise ValueError(f"initial_state must be (batch, heads, d_k, d_v), got {tuple(initial_state.shape)}")
    require_cuda(q.device)


def deltanet_chunk_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    chunk_size: int = 64,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Delta-rule outputs for prepared inputs, and optionally the final state.

    Args:
        q: `(B, H, N, d_k)`, already L2-normalised and scaled (see `DeltaNetReference.prepare`).
        k: `(B, H, N, d_k)`, L2-normalised. v: `(B, H, N, d_v)`. beta: `(B, H, N)` in (0, 1).
        chunk_size: tokens per chunk, a power of two >= 16.
        initial_state: `(B, H, d_k, d_v)` state before the first token (zeros when None).
        output_final_state: also return the fp32 state after the last token.
        out_dtype: dtype of the output (q's when None); 16-bit makes the GPU path use tensor cores.

    Returns:
        `(out (B, H, N, d_v) in out_dtype, final state or None)`.
    """
    _check_inputs(q, k, v, beta, chunk_size, initial_state)
    out_dtype = q.dtype if out_dtype is None else out_dtype
    batch, heads, n, d_k = k.shape
    d_v = v.shape[3]
    # Every tile in fp32 (ieee) for fp32 outputs and under the interpreter; tensor cores for 16-bit outputs.
    use_fp32_dot = dot_fp32(out_dtype)
    op_dtype = torch.float32 if use_fp32_dot else out_dtype
    # The WY factors: parallel over all chunks, computed in fp32 whatever the operands' dtype.
    _, w, u = wy_factors(k.float(), v.float(), beta.float(), chunk_size)
    w = w.reshape(batch, heads, -1, d_k).to(op_dtype)
    u = u.reshape(batch, heads, -1, d_v).to(op_dtype)
    q, k = q.to(op_dtype), k.to(op_dtype)
    out = torch.empty(batch, heads, n, d_v, dtype=out_dtype, device=q.device)
    final = torch.empty(batch, heads, d_k, d_v, dtype=torch.float32, device=q.device) if output_final_state else None
    s0 = None if initial_state is None else initial_state.float().contiguous()
    if n == 0:
        if final is not None:
            final.copy_(s0 if s0 is not None else torch.zeros_like(final))
        return out, final

    launch_chunk_loop(q, k, w, u, out, chunk_size, initial_state=s0, final_state=final)
    return out, final
