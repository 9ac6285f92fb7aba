"""FlashAttention-2-style forward pass in Triton.

One program owns one block of `BLOCK_M` queries of one (batch, head) and walks
the keys in blocks of `BLOCK_N`, keeping FlashAttention's online-softmax state
(running row max `m_i`, running row sum `l_i`, un-normalised fp32 output
`acc`) in registers, so the N x N score matrix never exists in memory. That is
the whole point of the method: the reference in `methods/softmax.py`
materialises the scores on purpose, this kernel removes them.

Conventions shared with the rest of attnbench (see `methods/oracle.py`):

* Layout is SDPA's `(batch, heads, seq, head_dim)`; any strides are accepted,
  so a transposed `(batch, seq, heads, head_dim)` tensor needs no copy.
* Causal masking is aligned bottom-right, as FlashAttention >= 2.1 and
  decoding are: query `i` sees key `j` iff `j <= i + (n_k - n_q)`. With more
  queries than keys the first queries see nothing; their output is exactly 0
  (the oracle's definition), never NaN.
* Scores are computed in base 2: `exp(s * scale) = exp2(s * scale * log2(e))`.
  Folding `log2(e)` into the scale saves one multiply per score and `exp2` is
  the hardware's native instruction (as in FA2 and Triton's tutorial).

The kernel also runs under Triton's interpreter (`TRITON_INTERPRET=1`) on CPU
tensors, which is how the test-suite checks it. The one concession to the
interpreter is `DOT_FP32` (see `common.dot_fp32`): every other line is what
runs on the GPU. The loop body (load a key tile, score it, fold it into the
online softmax) lives in `common.fold_key_tile`, shared with the block-sparse
kernel.

With `return_lse=True` the kernel also stores each row's natural log-sum-exp
(what `flash_bwd.py` needs to recompute the probabilities without a second
online-softmax pass). It is stored in natural log, as `block_sparse.py`
returns it, so every kernel's lse means the same thing; the backward converts
it to base 2 once per row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from methods.kernels.common import (
    LOG2E,
    MAX_HEAD_DIM,
    MIN_HEAD_DIM,
    attention_tiles,
    check_attention_inputs,
    dot_fp32,
    dot_tile,
    finish_rows,
    fold_key_tile,
    head_offsets,
    load_rows,
    softmax_state,
    store_rows,
    warps_for_head_dim,
)

__all__ = ["flash_attention_forward", "choose_config", "LaunchConfig", "MIN_HEAD_DIM", "MAX_HEAD_DIM"]


@triton.jit
def _attn_inner(
    acc, l_i, m_i, q, k_base, v_base,
    stride_kn, stride_kd,
    stride_vn, stride_vd,
    offs_m, offs_d, n_k, offset, qk_scale, lo, hi,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
    DOT_FP32: tl.constexpr,
):  # fmt: skip
    """Fold key blocks `[lo, hi)` into the online-softmax state and return `(acc, l_i, m_i)`.

    It is called twice per query block, with `MASKED` a compile-time flag:
    first over the key blocks every query of the block fully sees (no element
    mask, no boundary checks along the keys: the hot loop stays lean), then
    over the few blocks that straddle the causal diagonal or the end of the
    keys, where scores outside the mask become -inf.
    """
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        if MASKED:
            offs_n = start_n + tl.arange(0, BLOCK_N)
            keep = offs_n[None, :] < n_k
            if CAUSAL:
                keep = keep & (offs_m[:, None] + offset >= offs_n[None, :])
        else:
            keep = 0  # not read: unmasked blocks take every element
        acc, l_i, m_i = fold_key_tile(
            acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
            start_n, offs_d, n_k, qk_scale, keep,
            HEAD_DIM, BLOCK_N, MASKED, DOT_FP32,
        )  # fmt: skip
    return acc, l_i, m_i


@triton.jit
def _flash_fwd_kernel(
    Q, K, V, Out, Lse,
    stride_qz, stride_qh, stride_qm, stride_qd,
    stride_kz, stride_kh, stride_kn, stride_kd,
    stride_vz, stride_vh, stride_vn, stride_vd,
    stride_oz, stride_oh, stride_om, stride_od,
    stride_lz, stride_lh, stride_lm,
    n_heads, n_q, n_k, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_LSE: tl.constexpr, DOT_FP32: tl.constexpr,
):  # fmt: skip
    """One query block of one (batch, head): grid is `(cdiv(n_q, BLOCK_M), batch * heads)`.

    HAS_LSE: also store each row's natural log-sum-exp into `Lse` (batch, heads, n_q), for the backward;
    a compile-time flag, so the forward-only kernel does not even take the store.
    """
    _, off_z, off_h = head_offsets(n_heads)
    q_base = Q + off_z * stride_qz + off_h * stride_qh
    k_base = K + off_z * stride_kz + off_h * stride_kh
    v_base = V + off_z * stride_vz + off_h * stride_vh
    o_base = Out + off_z * stride_oz + off_h * stride_oh

    m_start = tl.program_id(0) * BLOCK_M
    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    # BLOCK_D is HEAD_DIM rounded up to a power of two (tl.arange needs one); the pad is masked to 0.
    row_ok, d_ok = offs_m < n_q, offs_d < HEAD_DIM
    q = load_rows(q_base, offs_m, row_ok, stride_qm, offs_d, d_ok, stride_qd)
    if DOT_FP32:
        q = q.to(tl.float32)
    acc, l_i, m_i = softmax_state(BLOCK_M, BLOCK_D)

    # Bottom-right alignment: query i sits at absolute position i + offset.
    offset = n_k - n_q
    if CAUSAL:
        # Keys [0, m_start + offset] are visible to every query of the block: no element mask there.
        full_end = tl.minimum(tl.maximum(m_start + offset + 1, 0), n_k)
        # The block's last query sees up to key m_start + BLOCK_M - 1 + offset; blocks past it are skipped.
        hi = tl.minimum(tl.maximum(m_start + BLOCK_M + offset, 0), n_k)
    else:
        full_end = n_k
        hi = n_k
    # Operands are clamped to >= 0 above, so truncating and flooring division agree here.
    full_end = (full_end // BLOCK_N) * BLOCK_N

    acc, l_i, m_i = _attn_inner(
        acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
        offs_m, offs_d, n_k, offset, qk_scale, 0, full_end,
        HEAD_DIM, BLOCK_N, False, CAUSAL, DOT_FP32,
    )  # fmt: skip
    acc, l_i, m_i = _attn_inner(
        acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
        offs_m, offs_d, n_k, offset, qk_scale, full_end, hi,
        HEAD_DIM, BLOCK_N, True, CAUSAL, DOT_FP32,
    )  # fmt: skip

    out, lse = finish_rows(acc, l_i, m_i)  # rows that saw no key are exactly 0, their lse -inf
    store_rows(o_base, offs_m, row_ok, stride_om, offs_d, d_ok, stride_od, out)
    if HAS_LSE:
        l_base = Lse + off_z * stride_lz + off_h * stride_lh
        tl.store(l_base + offs_m.to(tl.int64) * stride_lm, lse, mask=row_ok)


@dataclass(frozen=True)
class LaunchConfig:
    """Tile sizes and launch parameters chosen for one call (see `choose_config`)."""

    block_m: int
    block_n: int
    block_d: int
    num_warps: int
    num_stages: int


def choose_config(n_q: int, n_k: int, head_dim: int, dtype: torch.dtype) -> LaunchConfig:
    """`common.attention_tiles` (64 x 64, shrunk for short inputs, for head_dim 256 and for fp32 on the GPU)."""
    block_d = dot_tile(head_dim)
    block_m, block_n = attention_tiles(n_q, n_k, head_dim, dtype)
    return LaunchConfig(block_m, block_n, block_d, warps_for_head_dim(block_d), num_stages=2)


def flash_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    scale: float | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T * scale [+ causal mask]) v without materialising the scores.

    Args:
        q: `(batch, heads, n_q, head_dim)`, any strides.
        k, v: `(batch, heads, n_k, head_dim)`, any strides; `n_k` may differ from `n_q`.
        causal: bottom-right aligned causal mask (query i sees key j iff j <= i + n_k - n_q).
        scale: score scale, `1/sqrt(head_dim)` when None.
        return_lse: also return the natural log-sum-exp of each row's scaled scores, `(batch, heads, n_q)`
            float32 (-inf for rows that see no key): what the backward (`flash_bwd.py`) recomputes P from.

    Returns:
        A new tensor shaped and typed like `q` (and the lse when `return_lse`). Rows that see no key are 0.

    Raises:
        ValueError: on shapes, dtypes or devices the kernel does not handle (head_dim must be 1 to 256).
    """
    check_attention_inputs(q, k, v)
    batch, heads, n_q, head_dim = q.shape
    n_k = k.shape[2]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    # Only allocated when asked for; otherwise `out` stands in for the pointer the kernel never reads.
    lse = torch.empty((batch, heads, n_q), dtype=torch.float32, device=q.device) if return_lse else None
    if out.numel() == 0 or n_k == 0:
        out.zero_()  # no key at all: every row is empty, hence 0 by definition (lse -inf)
        return (out, lse.fill_(float("-inf"))) if return_lse else out

    cfg = choose_config(n_q, n_k, head_dim, q.dtype)
    grid = (triton.cdiv(n_q, cfg.block_m), batch * heads)
    _flash_fwd_kernel[grid](
        q, k, v, out, out if lse is None else lse,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *(lse.stride() if lse is not None else (0, 0, 0)),
        heads, n_q, n_k, scale * LOG2E,
        HEAD_DIM=head_dim,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_D=cfg.block_d,
        CAUSAL=bool(causal),
        HAS_LSE=lse is not None,
        DOT_FP32=dot_fp32(q.dtype),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )  # fmt: skip
    return (out, lse) if return_lse else out
