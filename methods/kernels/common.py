"""What the Triton kernels share: the online-softmax tile update, and the host-side checks and launch choices.

Device side (`@triton.jit` helpers, inlined into the kernels that call them):

* `online_softmax_step`: one tile of base-2 scores folded into FlashAttention's
  running row max and row sum; `flash_fwd.py`, `block_sparse.py`'s block-sparse
  kernel (through `fold_key_tile`) and its gather kernel all use it.
* `fold_key_tile`: one `BLOCK_N` tile of keys and values, loaded, scored with
  `tl.dot` and folded into `(acc, l_i, m_i)`: the loop body of the dense and
  the block-sparse kernels, which differ only in which tiles they visit and
  how they mask them.
* `finish_rows`: the output and log-sum-exp from the final state, with rows
  that saw no key at exactly 0 (lse -inf), never NaN.
* `load_rows` / `store_rows`: a (rows x columns) tile at int64 row offsets.
* `head_offsets` and `softmax_state`: every kernel's prologue (which (batch, head)
  this program owns; the empty online-softmax state).

Host side: the dtype/device checks every wrapper runs before a launch, the
`DOT_FP32` flag (and the interpreter test behind it), and power-of-two tile
sizes (`tl.arange` needs powers of two, `tl.dot` operands of at least 16).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = [
    "LOG2E",
    "MAX_HEAD_DIM",
    "MIN_HEAD_DIM",
    "SUPPORTED_DTYPES",
    "attention_tiles",
    "check_4d",
    "check_attention_inputs",
    "check_dtypes_and_device",
    "dot_fp32",
    "dot_tile",
    "finish_rows",
    "fold_key_tile",
    "head_offsets",
    "interpreting",
    "is_dot_tile",
    "load_rows",
    "online_softmax_step",
    "require_cuda",
    "softmax_state",
    "store_rows",
    "tile_dot",
    "warps_for_head_dim",
]

LOG2E = 1.4426950408889634  # log2(e): exp(x) == exp2(x * log2(e))
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MIN_HEAD_DIM = 1  # head dims the softmax kernels (flash_fwd, block_sparse) take
MAX_HEAD_DIM = 256


# --- device side ------------------------------------------------------------------------------------------------------


@triton.jit
def tile_dot(a, b, DOT_FP32: tl.constexpr):
    """`a @ b` in fp32: exact fp32 products (`input_precision="ieee"`, not TF32) for fp32 tiles and under the
    interpreter, the tensor cores' native 16-bit products with fp32 accumulation otherwise (see `common.dot_fp32`)."""
    if DOT_FP32:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def head_offsets(n_heads):
    """`(off_bh, off_z, off_h)`: the (batch x heads) index this program owns (grid axis 1), and its batch and
    head in int64, so base offsets `off_z * stride_z + off_h * stride_h` cannot overflow on large inputs."""
    off_bh = tl.program_id(1)
    return off_bh, (off_bh // n_heads).to(tl.int64), (off_bh % n_heads).to(tl.int64)


@triton.jit
def softmax_state(BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """FlashAttention's online-softmax state before any key: `(acc, l_i, m_i)` = (0, 0, -inf), all fp32."""
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    return acc, l_i, m_i


@triton.jit
def online_softmax_step(qk, m_i, l_i, MAY_BE_EMPTY: tl.constexpr):
    """Fold one tile of base-2 scores `qk` (rows x keys) into the running max `m_i` and sum `l_i`.

    Returns `(p, alpha, m_new, l_new)`: `p = exp2(qk - m_new)` are the tile's
    un-normalised weights and `alpha = exp2(m_i - m_new)` rescales everything
    accumulated before, so the caller updates its output as
    `acc * alpha[:, None] + p @ v`.

    MAY_BE_EMPTY: some row may have seen only -inf scores so far (masked
    tiles). Its max stays -inf; subtracting 0 instead keeps exp2 at 0, not
    NaN. Unmasked tiles come first, so every row's max is finite from the
    first of them on and the check compiles away there.
    """
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    if MAY_BE_EMPTY:
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_sub = m_new
    p = tl.math.exp2(qk - m_sub[:, None])
    alpha = tl.math.exp2(m_i - m_sub)
    l_i = l_i * alpha + tl.sum(p, 1)
    return p, alpha, m_new, l_i


@triton.jit
def fold_key_tile(
    acc, l_i, m_i, q, k_base, v_base,
    stride_kn, stride_kd,
    stride_vn, stride_vd,
    start_n, offs_d, n_k, qk_scale, keep,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, DOT_FP32: tl.constexpr,
):  # fmt: skip
    """Fold the keys `[start_n, start_n + BLOCK_N)` into the online-softmax state and return `(acc, l_i, m_i)`.

    `q` is the query tile (fp32 when DOT_FP32), `qk_scale` the score scale
    times log2(e). With MASKED a compile-time False the tile is taken whole:
    no bounds check along the keys and no element mask, the lean hot loop of
    the tiles every query of the block fully sees; `keep` is not read (pass 0).
    With MASKED, keys past `n_k` are not loaded and scores where `keep`
    (rows x BLOCK_N, the caller's causal and pattern mask, key bound included)
    is False become -inf.
    """
    offs_n_base = tl.arange(0, BLOCK_N)
    d_mask = offs_d < HEAD_DIM
    # Scalar block offset in int64, tile offsets in int32: no overflow on long or strided inputs.
    k_ptrs = k_base + start_n.to(tl.int64) * stride_kn + offs_n_base[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_ptrs = v_base + start_n.to(tl.int64) * stride_vn + offs_n_base[:, None] * stride_vn + offs_d[None, :] * stride_vd
    if MASKED:
        kv_mask = ((start_n + offs_n_base)[:, None] < n_k) & d_mask[None, :]
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
        qk = tl.where(keep, qk, float("-inf"))

    p, alpha, m_i, l_i = online_softmax_step(qk, m_i, l_i, MASKED)
    acc = acc * alpha[:, None]
    v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
    if DOT_FP32:
        acc = tl.dot(p, v.to(tl.float32), acc, input_precision="ieee")
    else:
        # As FA2: probabilities in [0, 1] are cast to v's 16-bit type for the tensor cores.
        acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, l_i, m_i


@triton.jit
def finish_rows(acc, l_i, m_i):
    """`(out, lse)` from the final state: out = acc / l, lse the natural log-sum-exp of the scaled scores.

    Rows that saw no key have l_i == 0 and acc == 0: dividing by 1 leaves them
    exactly 0, and their lse is -inf.
    """
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)  # * ln(2)
    return out, lse


@triton.jit
def load_rows(base, rows, row_ok, stride_row, cols, col_ok, stride_col):
    """The tile `base[rows, cols]` (rows in int64, so long or strided inputs cannot overflow); 0 outside the masks."""
    ptrs = base + rows[:, None].to(tl.int64) * stride_row + cols[None, :] * stride_col
    return tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)


@triton.jit
def store_rows(base, rows, row_ok, stride_row, cols, col_ok, stride_col, value):
    """Store `value` into `base[rows, cols]` inside the masks, cast to the destination's dtype."""
    ptrs = base + rows[:, None].to(tl.int64) * stride_row + cols[None, :] * stride_col
    tl.store(ptrs, value.to(base.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


# --- host side --------------------------------------------------------------------------------------------------------


def interpreting() -> bool:
    """True under Triton's interpreter (`TRITON_INTERPRET=1`), read at call time."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def dot_fp32(dtype: torch.dtype) -> bool:
    """The kernels' `DOT_FP32` flag: every tile upcast and `tl.dot(..., input_precision="ieee")`.

    Under the interpreter `tl.dot` on 16-bit tiles is silently wrong (bf16
    especially), so every tile is upcast there. On the GPU only fp32 takes this
    path, with input_precision="ieee": Triton's default for fp32 is TF32 (10-bit
    mantissa), which would make an fp32 kernel no more accurate than fp16 and
    fail the oracle tolerance that the PyTorch fp32 reference sets.
    """
    return interpreting() or dtype == torch.float32


def dot_tile(n: int, cap: int | None = None) -> int:
    """`n` rounded up to a power of two (`tl.arange` needs one), at least 16 (`tl.dot`'s smallest operand), at most `cap`."""
    tile = max(16, triton.next_power_of_2(max(n, 1)))
    return tile if cap is None else min(cap, tile)


def is_dot_tile(n: int) -> bool:
    """Whether `n` can be a `tl.dot` tile as it is: a power of two >= 16."""
    return n >= 16 and not n & (n - 1)


def attention_tiles(n_q: int, n_k: int, head_dim: int, dtype: torch.dtype | None = None) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) of the softmax kernels, a fixed heuristic instead of `triton.autotune` (no autotune
    under the interpreter).

    64 x 64 tiles by default: big enough to keep the tensor cores busy on the
    GPU and to keep the interpreter's per-op overhead low on CPU. Short
    sequences (decode, tiny tests) shrink the tile to the next power of two,
    never below 16. On the GPU (sizes from compiling every configuration for
    sm_80 and sm_90, `bench.kernel_fit`): at head_dim 256 the K/V tiles would
    overflow shared memory with two pipeline stages, so the key tile shrinks to
    32; fp32 from head_dim 64 on takes 32 x 32, because fp32 `ieee` dots run on
    the FMA units with their operands in registers, and 64-wide fp32 tiles
    spilled 2-28 KB per program (fp32 is the GPU's correctness dtype, not its
    speed one).
    """
    block_m, block_n = dot_tile(n_q, 64), dot_tile(n_k, 64)
    if not interpreting():
        if head_dim > 128:
            block_n = min(block_n, 32)
        if dtype == torch.float32 and head_dim > 32:
            block_m, block_n = min(block_m, 32), min(block_n, 32)
    return block_m, block_n


def warps_for_head_dim(block_d: int) -> int:
    """Warps per program of the softmax kernels: 8 from a (padded) head dim of 128 on, else 4."""
    return 8 if block_d >= 128 else 4


def check_4d(tensors: dict[str, torch.Tensor], last_dim: str = "head_dim") -> None:
    """Raise a one-line ValueError unless every tensor is 4-D `(batch, heads, seq, last_dim)`."""
    for name, t in tensors.items():
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (batch, heads, seq, {last_dim}), got shape {tuple(t.shape)}")


def check_dtypes_and_device(tensors: dict[str, torch.Tensor]) -> None:
    """Raise a one-line ValueError unless the tensors share one supported dtype and one device the kernel runs on."""
    first = next(iter(tensors.values()))
    if any(t.dtype != first.dtype for t in tensors.values()):
        found = ", ".join(f"{name} {t.dtype}" for name, t in tensors.items())
        raise ValueError(f"dtype mismatch: {found} (must be equal)")
    if first.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype {first.dtype} is not supported; supported: float32, float16, bfloat16")
    if any(t.device != first.device for t in tensors.values()):
        raise ValueError("device mismatch: " + ", ".join(f"{name} {t.device}" for name, t in tensors.items()))
    require_cuda(first.device)


def require_cuda(device: torch.device) -> None:
    """Raise a one-line ValueError unless the kernel can run on `device`: CUDA, or anything under the interpreter."""
    if device.type != "cuda" and not interpreting():
        raise ValueError(f"tensors are on {device}; the kernel needs CUDA (or TRITON_INTERPRET=1 for CPU tests)")


def check_attention_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """The softmax kernels' checks: one-line ValueErrors for anything they cannot compute, before a launch."""
    check_4d({"q": q, "k": k, "v": v})
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
    check_dtypes_and_device({"q": q, "k": k, "v": v})
