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
interpreter is `DOT_FP32` (see `_dot_fp32`): every other line is what runs on
the GPU.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

__all__ = ["flash_attention_forward", "MIN_HEAD_DIM", "MAX_HEAD_DIM"]

MIN_HEAD_DIM = 1
MAX_HEAD_DIM = 256
_LOG2E = 1.4426950408889634  # log2(e): exp(x) == exp2(x * log2(e))
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _attn_inner(
    acc,
    l_i,
    m_i,
    q,
    k_base,
    v_base,
    stride_kn,
    stride_kd,
    stride_vn,
    stride_vd,
    offs_m,
    offs_d,
    n_k,
    offset,
    qk_scale,
    lo,
    hi,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    """Fold key blocks `[lo, hi)` into the online-softmax state and return `(acc, l_i, m_i)`.

    It is called twice per query block, with `MASKED` a compile-time flag:
    first over the key blocks every query of the block fully sees (no element
    mask, no boundary checks along the keys: the hot loop stays lean), then
    over the few blocks that straddle the causal diagonal or the end of the
    keys, where scores outside the mask become -inf.
    """
    offs_n_base = tl.arange(0, BLOCK_N)
    d_mask = offs_d < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + offs_n_base
        # Scalar block offset in int64, tile offsets in int32: no overflow on long or strided inputs.
        k_ptrs = (
            k_base + start_n.to(tl.int64) * stride_kn + offs_n_base[:, None] * stride_kn + offs_d[None, :] * stride_kd
        )
        v_ptrs = (
            v_base + start_n.to(tl.int64) * stride_vn + offs_n_base[:, None] * stride_vn + offs_d[None, :] * stride_vd
        )
        if MASKED:
            kv_mask = (offs_n[:, None] < n_k) & d_mask[None, :]
        else:
            kv_mask = d_mask[None, :]
        k = tl.load(k_ptrs, mask=kv_mask, other=0.0)

        # Scores in base 2. fp32 inputs (and everything under the interpreter) use an exact fp32 dot;
        # fp16/bf16 on the GPU go to the tensor cores natively and accumulate in fp32.
        if DOT_FP32:
            qk = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            qk = tl.dot(q, tl.trans(k))
        qk = qk * qk_scale

        if MASKED:
            keep = offs_n[None, :] < n_k
            if CAUSAL:
                keep = keep & (offs_m[:, None] + offset >= offs_n[None, :])
            qk = tl.where(keep, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            # A row that has seen no key yet keeps m = -inf; subtracting 0 instead keeps exp2 at 0, not NaN.
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            # Unmasked blocks come first, so every row's max is finite from the first block on.
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_sub = m_new

        p = tl.math.exp2(qk - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]

        v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
        if DOT_FP32:
            acc = tl.dot(p, v.to(tl.float32), acc, input_precision="ieee")
        else:
            # As FA2: probabilities in [0, 1] are cast to v's 16-bit type for the tensor cores.
            acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _flash_fwd_kernel(
    Q,
    K,
    V,
    Out,
    stride_qz,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kz,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vz,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_oz,
    stride_oh,
    stride_om,
    stride_od,
    n_heads,
    n_q,
    n_k,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    """One query block of one (batch, head): grid is `(cdiv(n_q, BLOCK_M), batch * heads)`."""
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_z = (off_bh // n_heads).to(tl.int64)
    off_h = (off_bh % n_heads).to(tl.int64)

    q_base = Q + off_z * stride_qz + off_h * stride_qh
    k_base = K + off_z * stride_kz + off_h * stride_kh
    v_base = V + off_z * stride_vz + off_h * stride_vh
    o_base = Out + off_z * stride_oz + off_h * stride_oh

    m_start = start_m * BLOCK_M
    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    # BLOCK_D is HEAD_DIM rounded up to a power of two (tl.arange needs one); the pad is masked to 0.
    q_mask = (offs_m[:, None] < n_q) & (offs_d[None, :] < HEAD_DIM)
    q_ptrs = q_base + offs_m[:, None].to(tl.int64) * stride_qm + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=q_mask, other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

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

    # Rows that saw no key have l_i == 0 and acc == 0: dividing by 1 leaves them exactly 0.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    o_ptrs = o_base + offs_m[:, None].to(tl.int64) * stride_om + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=q_mask)


@dataclass(frozen=True)
class LaunchConfig:
    """Tile sizes and launch parameters chosen for one call (see `choose_config`)."""

    block_m: int
    block_n: int
    block_d: int
    num_warps: int
    num_stages: int


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def choose_config(n_q: int, n_k: int, head_dim: int, dtype: torch.dtype) -> LaunchConfig:
    """A fixed heuristic instead of `triton.autotune`, which does not work under the interpreter.

    64 x 64 tiles by default: big enough to keep the tensor cores busy on the
    GPU and to keep the interpreter's per-op overhead low on CPU. Short
    sequences (decode, tiny tests) shrink the tile to the next power of two,
    never below 16, `tl.dot`'s smallest operand. At head_dim 256 the K/V
    tiles would overflow shared memory with two pipeline stages, so the key
    tile shrinks (and the query tile too for fp32). fp32 at head_dim 128 with
    64 x 64 fits in an H100's 228 KB of shared memory.
    """
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_m = min(64, max(16, triton.next_power_of_2(n_q)))
    block_n = min(64, max(16, triton.next_power_of_2(n_k)))
    if block_d > 128 and not _interpreting():
        block_n = min(block_n, 32)
        if dtype == torch.float32:
            block_m = min(block_m, 32)
    num_warps = 8 if block_d >= 128 else 4
    num_stages = 2
    return LaunchConfig(block_m, block_n, block_d, num_warps, num_stages)


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Raise a one-line ValueError for anything the kernel cannot compute, before launching it."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (batch, heads, seq, head_dim), got shape {tuple(t.shape)}")
    if q.shape[:2] != k.shape[:2] or q.shape[:2] != v.shape[:2]:
        raise ValueError(
            f"batch/heads mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} (expected equal batch and heads)"
        )
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"k and v lengths differ: k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not (q.shape[3] == k.shape[3] == v.shape[3]):
        raise ValueError(f"head_dim mismatch: q {q.shape[3]}, k {k.shape[3]}, v {v.shape[3]} (must be equal)")
    head_dim = q.shape[3]
    if not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim {head_dim} is not supported; supported range is {MIN_HEAD_DIM} to {MAX_HEAD_DIM}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"dtype mismatch: q {q.dtype}, k {k.dtype}, v {v.dtype} (must be equal)")
    if q.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"dtype {q.dtype} is not supported; supported: float32, float16, bfloat16")
    if not (q.device == k.device == v.device):
        raise ValueError(f"device mismatch: q {q.device}, k {k.device}, v {v.device}")
    if q.device.type != "cuda" and not _interpreting():
        raise ValueError(f"tensors are on {q.device}; the kernel needs CUDA (or TRITON_INTERPRET=1 for CPU tests)")


def flash_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale [+ causal mask]) v without materialising the scores.

    Args:
        q: `(batch, heads, n_q, head_dim)`, any strides.
        k, v: `(batch, heads, n_k, head_dim)`, any strides; `n_k` may differ from `n_q`.
        causal: bottom-right aligned causal mask (query i sees key j iff j <= i + n_k - n_q).
        scale: score scale, `1/sqrt(head_dim)` when None.

    Returns:
        A new tensor shaped and typed like `q`. Rows that see no key are 0.

    Raises:
        ValueError: on shapes, dtypes or devices the kernel does not handle (head_dim must be 1 to 256).
    """
    _check_inputs(q, k, v)
    batch, heads, n_q, head_dim = q.shape
    n_k = k.shape[2]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    if n_k == 0:
        return out.zero_()  # no key at all: every row is empty, hence 0 by definition

    cfg = choose_config(n_q, n_k, head_dim, q.dtype)
    # Under the interpreter tl.dot on 16-bit tiles is silently wrong (bf16 especially), so every tile is
    # upcast there. On the GPU only fp32 inputs take this path, with input_precision="ieee": Triton's
    # default for fp32 is TF32 (10-bit mantissa), which would make the fp32 kernel no more accurate than
    # fp16 and fail the oracle tolerance that the PyTorch fp32 reference sets.
    dot_fp32 = _interpreting() or q.dtype == torch.float32
    grid = (triton.cdiv(n_q, cfg.block_m), batch * heads)
    _flash_fwd_kernel[grid](
        q, k, v, out,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        heads, n_q, n_k, scale * _LOG2E,
        HEAD_DIM=head_dim,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_D=cfg.block_d,
        CAUSAL=bool(causal),
        DOT_FP32=dot_fp32,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )  # fmt: skip
    return out
