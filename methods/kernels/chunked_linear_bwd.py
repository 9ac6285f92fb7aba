"""Backward of the chunked linear-attention kernel in Triton, and the autograd wiring that pairs it with the forward.

With scores A[t, s] = (phi_q_t . phi_k_s) lambda^(t - s) (s <= t when causal,
lambda = 1 without decay), the forward computes num = A v and, when it
normalises, den = A 1 and out = num / max(den, eps). Writing

    g_t    = dO_t / max(den_t, eps)                      (the gradient reaching num)
    dden_t = -(dO_t . out_t) / max(den_t, eps)           where den_t >= eps, else 0 (the clamp's flat side)

both num and den are unnormalised linear attentions, den with an implicit
all-ones value column. So the backward is that of unnormalised (decayed)
linear attention with one extra vector state, dA[t, s] = lambda^(t-s) (g_t . v_s + dden_t):

    dphi_q_t = sum_{s<=t} dA[t, s] phi_k_s           = lambda-decayed (g_t S_t^T + dden_t z_t)
    dphi_k_s = sum_{t>=s} dA[t, s] phi_q_t           = lambda-decayed (v_s dS_s^T + dz_s)
    dv_s     = sum_{t>=s} A[t, s] g_t                = lambda-decayed (phi_k_s dS_s)

with the forward's states S, z (prefix sums over keys) and their mirror
images dS = sum_{t>=s} phi_q_t^T g_t, dz = sum_{t>=s} dden_t phi_q_t (suffix
sums over queries). Two kernels walk the chunks as the forward does, each with
the masked C x C tile inside a chunk and a state across chunks:

1. `_dq_kernel`: forward over the chunks, carrying (S, z), as the forward pass.
2. `_dkdv_kernel`: backward over the chunks, carrying (dS, dz).

Non-causal is the same with two global sums per kernel (build the state, then
read it). Before both, flash's `delta_kernel` gives rowsum(dO * out) (one
fp32 number per query, from the output in its own dtype as FlashAttention-2
does), and `dden` and `1 / max(den, eps)` are formed in PyTorch from the
forward's stored normaliser (`return_den`): recomputing den here would cost
a second C x C score tile per chunk in `_dq_kernel`.

The value dim is split over programs (`BLOCK_V`), as in the forward, and dq,
dk come out as fp32 partial sums over the value blocks that PyTorch then adds
(fla does the same). The alternative, one program owning the whole value
dim, would need a BLOCK_F x Dv fp32 state (and dS), 16k elements at
Performer's 256 features x 64, twice the register budget the forward keeps
to; partials cost an extra (value blocks x N x F) fp32 buffer, and nothing
under the interpreter, where one block covers the value dim. The dden terms
(and dz) belong to the first value block only, so they are counted once.

The gradient of log(lambda) needs no kernel: d/dg of lambda^(t-s) = exp(g (t-s))
is (t - s) times it, so dL/dg = sum_t t (phi_q_t . dphi_q_t) - sum_s s (phi_k_s . dphi_k_s)
(t, s token positions; the query rows see decay through their distance to
each key only), taken from the kernels' fp32 dq, dk.

Conventions are the forward's (`chunked_linear.py`): bottom-right causal
alignment (queries before the first key output 0 and get gradient 0), fp32
states and accumulation, `DOT_FP32` under the interpreter and for fp32 on the
GPU, 16-bit tiles (and the fp32 states cast down) on the tensor cores
otherwise, with 1 / den rescaled per chunk before such a cast (`_row_scales`).
Initial and final states (decode) are not differentiable: the
differentiable entry has no such arguments.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from methods.kernels.chunked_linear import (
    LaunchConfig,
    _check_inputs,
    causal_chunk_rows,
    causal_walk_setup,
    chunk_offsets,
    chunked_linear_attention_forward,
)
from methods.kernels.common import dot_fp32, dot_tile, head_offsets, interpreting, load_rows, store_rows, tile_dot
from methods.kernels.flash_bwd import delta_kernel

# Configurations `bench.kernel_fit` measured over its spill budget that no tile choice here fixed: reported by
# the check, not failed. sm_80 only (the same tiles fit sm_90), at the smallest chunk tile (16) and value block.
GPU_FIT_KNOWN = [
    ("_dq_kernel", 80, {"BLOCK_F": 512, "CAUSAL": True, "DOT_FP32": False},
     "16-bit causal at 512 padded features (cosformer from head dim 192) spills 6-7 KB on sm_80 at 4, 8 and 16 warps"),
    ("_dkdv_kernel", 80, {"BLOCK_F": 512, "CAUSAL": True, "DOT_FP32": False},
     "16-bit causal at 512 padded features spills 1.2-6.3 KB on sm_80 at 4, 8 and 16 warps"),
]  # fmt: skip

__all__ = [
    "ChunkedLinearAttentionFunction",
    "chunked_linear_attention",
    "chunked_linear_attention_backward",
    "choose_backward_config",
]

# Shared-memory budget of the backward's tile estimate (`choose_backward_config`): well under the 160 KB the
# kernels aim to stay below on Hopper, since Triton's layout conversions stage some tiles a second time.
_SMEM_BUDGET = 96 * 1024
# fp32 values one program keeps live (8 warps x 32 threads x ~80 registers), past which ptxas spills: checked by
# compiling for sm_90 (no spill at 64 x 64 fp16 with 32-token chunks, spills with 64).
_LIVE_BUDGET = 20480


# --- device side ------------------------------------------------------------------------------------------------------


@triton.jit
def _row_scales(inv_base, dden_base, rows, row_ok, pid_v, NORMALIZE: tl.constexpr):
    """`(inv / m, dden / m, m)` of the query rows, with inv = 1 / max(den, eps), dden the normaliser's gradient
    (both 0 outside `row_ok`) and m the largest inv of the tile (1 if none).

    The tiles that carry inv into a 16-bit `tl.dot` (phi_q * inv, the scores
    times inv, dA) are as small as 1 / den: about 1e-5 per feature at 1k
    tokens of 64 elu features, fp16's subnormal range, where it keeps 2 or 3
    digits. Divided by m they stay within a chunk's spread of den of 1, and the
    fp32 product is multiplied back by m. dden is kept by the first value block
    only: every block computes the same rows, and dq, dk are summed over blocks
    afterwards. Without a normaliser inv is 1 for real rows and dden 0.
    """
    if NORMALIZE:
        inv = tl.load(inv_base + rows, mask=row_ok, other=0.0)
        dden = tl.load(dden_base + rows, mask=row_ok & (pid_v == 0), other=0.0)
        m = tl.max(inv, 0)
        m = tl.where(m > 0.0, m, 1.0)
        return inv / m, dden / m, m
    else:
        inv = tl.where(row_ok, 1.0, 0.0)
        return inv, tl.zeros_like(inv), 1.0


@triton.jit
def _dq_kernel(
    K, V, DO, Inv, Dden, LogDecay, DQ,
    stride_kz, stride_kh, stride_kn, stride_kf,
    stride_vz, stride_vh, stride_vn, stride_vd,
    stride_dz, stride_dh, stride_dm, stride_dd,
    n_heads, n_q, n_k,
    FEAT: tl.constexpr, DV: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_F: tl.constexpr,
    BLOCK_V: tl.constexpr, CAUSAL: tl.constexpr, HAS_DECAY: tl.constexpr, NORMALIZE: tl.constexpr,
    DOT_FP32: tl.constexpr,
):  # fmt: skip
    """dq's partial sum over one value block: grid `(cdiv(DV, BLOCK_V), batch * heads)`.

    DQ is contiguous fp32 `(value blocks, batch * heads, n_q, FEAT)`; Inv, Dden contiguous fp32 `(batch * heads, n_q)`.
    """
    pid_v = tl.program_id(0)
    off_bh, off_z, off_h = head_offsets(n_heads)
    k_base = K + off_z * stride_kz + off_h * stride_kh
    v_base = V + off_z * stride_vz + off_h * stride_vh
    do_base = DO + off_z * stride_dz + off_h * stride_dh
    inv_base = Inv + off_bh.to(tl.int64) * n_q
    dden_base = Dden + off_bh.to(tl.int64) * n_q
    dq_base = DQ + (pid_v * tl.num_programs(1) + off_bh).to(tl.int64) * n_q * FEAT

    offs_c, offs_f, offs_v, f_mask, v_mask = chunk_offsets(pid_v, FEAT, DV, BLOCK_C, BLOCK_F, BLOCK_V)
    s = tl.zeros([BLOCK_F, BLOCK_V], dtype=tl.float32)
    z = tl.zeros([BLOCK_F], dtype=tl.float32)

    if CAUSAL:
        offset, g, keep = causal_walk_setup(n_q, n_k, LogDecay, off_h, offs_c, HAS_DECAY)
        for start in range(0, n_k, BLOCK_C):
            pos, k_row, q_idx, q_row = causal_chunk_rows(start, offs_c, n_k, offset)
            k = load_rows(k_base, pos, k_row, stride_kn, offs_f, f_mask, stride_kf)
            v = load_rows(v_base, pos, k_row, stride_vn, offs_v, v_mask, stride_vd)
            do = load_rows(do_base, q_idx, q_row, stride_dm, offs_v, v_mask, stride_dd)
            if DOT_FP32:
                k, v, do = k.to(tl.float32), v.to(tl.float32), do.to(tl.float32)
            inv, dden, m = _row_scales(inv_base, dden_base, q_idx, q_row, pid_v, NORMALIZE)

            # dA / m = lambda^(t-s) (g_t . v_s + dden_t) / m inside the chunk; rows without a query have dO = inv = 0.
            da = tile_dot(do, tl.trans(v), DOT_FP32) * inv[:, None] + dden[:, None]
            if HAS_DECAY:
                # As the forward: row t reads the state before the chunk at distance t + 1 (chunk-local t).
                dist = tl.where(keep, offs_c[:, None] - offs_c[None, :], 0).to(tl.float32)
                da = tl.where(keep, da * tl.exp(g * dist), 0.0)
                row_decay = tl.exp(g * (offs_c + 1).to(tl.float32))
                length = tl.minimum(n_k - start, BLOCK_C)
                k_in = k * tl.exp(g * tl.maximum(length - 1 - offs_c, 0).to(tl.float32))[:, None].to(k.dtype)
                chunk_decay = tl.exp(g * length.to(tl.float32))
            else:
                da = tl.where(keep, da, 0.0)
                row_decay = tl.full([BLOCK_C], 1.0, dtype=tl.float32)
                k_in = k
                chunk_decay = 1.0

            # Across chunks: g_t S^T + dden_t z, S and z the state before the chunk.
            dq = tile_dot(do, tl.trans(s.to(do.dtype)), DOT_FP32) * (inv * row_decay)[:, None]
            dq += (dden * row_decay)[:, None] * z[None, :]
            dq = (dq + tile_dot(da.to(k.dtype), k, DOT_FP32)) * m
            store_rows(dq_base, q_idx, q_row, FEAT, offs_f, f_mask, 1, dq)

            s = s * chunk_decay + tile_dot(tl.trans(k_in), v, DOT_FP32)
            if NORMALIZE:
                z = z * chunk_decay + tl.sum(k_in.to(tl.float32), 0)
    else:
        for start in range(0, n_k, BLOCK_C):
            pos = start + offs_c
            k_row = pos < n_k
            k = load_rows(k_base, pos, k_row, stride_kn, offs_f, f_mask, stride_kf)
            v = load_rows(v_base, pos, k_row, stride_vn, offs_v, v_mask, stride_vd)
            if DOT_FP32:
                k, v = k.to(tl.float32), v.to(tl.float32)
            s += tile_dot(tl.trans(k), v, DOT_FP32)
            if NORMALIZE:
                z += tl.sum(k.to(tl.float32), 0)
        s_read = s.to(DO.dtype.element_ty)
        if DOT_FP32:
            s_read = s
        for start in range(0, n_q, BLOCK_C):
            rows = start + offs_c
            q_row = rows < n_q
            do = load_rows(do_base, rows, q_row, stride_dm, offs_v, v_mask, stride_dd)
            if DOT_FP32:
                do = do.to(tl.float32)
            inv, dden, m = _row_scales(inv_base, dden_base, rows, q_row, pid_v, NORMALIZE)
            dq = (tile_dot(do, tl.trans(s_read), DOT_FP32) * inv[:, None] + dden[:, None] * z[None, :]) * m
            store_rows(dq_base, rows, q_row, FEAT, offs_f, f_mask, 1, dq)


@triton.jit
def _dkdv_kernel(
    Q, K, V, DO, Inv, Dden, LogDecay, DK, DVal,
    stride_qz, stride_qh, stride_qm, stride_qf,
    stride_kz, stride_kh, stride_kn, stride_kf,
    stride_vz, stride_vh, stride_vn, stride_vd,
    stride_dz, stride_dh, stride_dm, stride_dd,
    stride_gz, stride_gh, stride_gn, stride_gd,
    n_heads, n_q, n_k,
    FEAT: tl.constexpr, DV: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_F: tl.constexpr,
    BLOCK_V: tl.constexpr, CAUSAL: tl.constexpr, HAS_DECAY: tl.constexpr, NORMALIZE: tl.constexpr,
    DOT_FP32: tl.constexpr,
):  # fmt: skip
    """dk's partial sum over one value block and dv's columns of that block: grid `(cdiv(DV, BLOCK_V), batch * heads)`.

    DK is contiguous fp32 `(value blocks, batch * heads, n_k, FEAT)`; DVal is shaped like v (strides `stride_g*`).
    """
    pid_v = tl.program_id(0)
    off_bh, off_z, off_h = head_offsets(n_heads)
    q_base = Q + off_z * stride_qz + off_h * stride_qh
    k_base = K + off_z * stride_kz + off_h * stride_kh
    v_base = V + off_z * stride_vz + off_h * stride_vh
    do_base = DO + off_z * stride_dz + off_h * stride_dh
    dv_base = DVal + off_z * stride_gz + off_h * stride_gh
    inv_base = Inv + off_bh.to(tl.int64) * n_q
    dden_base = Dden + off_bh.to(tl.int64) * n_q
    dk_base = DK + (pid_v * tl.num_programs(1) + off_bh).to(tl.int64) * n_k * FEAT

    offs_c, offs_f, offs_v, f_mask, v_mask = chunk_offsets(pid_v, FEAT, DV, BLOCK_C, BLOCK_F, BLOCK_V)
    # dS = sum_t phi_q_t^T g_t and dz = sum_t dden_t phi_q_t over the queries after the current chunk.
    ds = tl.zeros([BLOCK_F, BLOCK_V], dtype=tl.float32)
    dz = tl.zeros([BLOCK_F], dtype=tl.float32)

    if CAUSAL:
        offset, g, keep = causal_walk_setup(n_q, n_k, LogDecay, off_h, offs_c, HAS_DECAY)
        n_chunks = tl.cdiv(n_k, BLOCK_C)
        for i in range(0, n_chunks):
            start = (n_chunks - 1 - i) * BLOCK_C
            pos, k_row, q_idx, q_row = causal_chunk_rows(start, offs_c, n_k, offset)
            q = load_rows(q_base, q_idx, q_row, stride_qm, offs_f, f_mask, stride_qf)
            k = load_rows(k_base, pos, k_row, stride_kn, offs_f, f_mask, stride_kf)
            v = load_rows(v_base, pos, k_row, stride_vn, offs_v, v_mask, stride_vd)
            do = load_rows(do_base, q_idx, q_row, stride_dm, offs_v, v_mask, stride_dd)
            if DOT_FP32:
                q, k, v, do = q.to(tl.float32), k.to(tl.float32), v.to(tl.float32), do.to(tl.float32)
            inv, dden, m = _row_scales(inv_base, dden_base, q_idx, q_row, pid_v, NORMALIZE)

            # Rows t (queries), columns s (keys) of the chunk: p = A / max(den, eps) / m, da = dA / m.
            p = tile_dot(q, tl.trans(k), DOT_FP32) * inv[:, None]
            da = tile_dot(do, tl.trans(v), DOT_FP32) * inv[:, None] + dden[:, None]
            length = tl.minimum(n_k - start, BLOCK_C)
            if HAS_DECAY:
                dist = tl.where(keep, offs_c[:, None] - offs_c[None, :], 0).to(tl.float32)
                w = tl.exp(g * dist)
                p = tl.where(keep, p * w, 0.0)
                da = tl.where(keep, da * w, 0.0)
                # dS, dz are referenced to the token after the chunk: key s is length - s before it,
                # query t is t after the chunk's start (chunk-local s, t).
                key_decay = tl.exp(g * tl.maximum(length - offs_c, 0).to(tl.float32))
                q_decay = tl.exp(g * offs_c.to(tl.float32))
                chunk_decay = tl.exp(g * length.to(tl.float32))
            else:
                p = tl.where(keep, p, 0.0)
                da = tl.where(keep, da, 0.0)
                key_decay = tl.full([BLOCK_C], 1.0, dtype=tl.float32)
                q_decay = key_decay
                chunk_decay = 1.0

            dv = tile_dot(k, ds.to(k.dtype), DOT_FP32) * key_decay[:, None]
            dv += tile_dot(tl.trans(p.to(do.dtype)), do, DOT_FP32) * m
            store_rows(dv_base, pos, k_row, stride_gn, offs_v, v_mask, stride_gd, dv)
            dk = (tile_dot(v, tl.trans(ds.to(v.dtype)), DOT_FP32) + dz[None, :]) * key_decay[:, None]
            dk += tile_dot(tl.trans(da.to(q.dtype)), q, DOT_FP32) * m
            store_rows(dk_base, pos, k_row, FEAT, offs_f, f_mask, 1, dk)

            # Fold the chunk's queries in, then step the reference back to the chunk's first token.
            q_g = q.to(tl.float32) * (inv * q_decay)[:, None]
            ds = ds * chunk_decay + tile_dot(tl.trans(q_g.to(do.dtype)), do, DOT_FP32) * m
            if NORMALIZE:
                dz = dz * chunk_decay + tl.sum(q.to(tl.float32) * (dden * q_decay * m)[:, None], 0)
    else:
        for start in range(0, n_q, BLOCK_C):
            rows = start + offs_c
            q_row = rows < n_q
            q = load_rows(q_base, rows, q_row, stride_qm, offs_f, f_mask, stride_qf)
            do = load_rows(do_base, rows, q_row, stride_dm, offs_v, v_mask, stride_dd)
            if DOT_FP32:
                q, do = q.to(tl.float32), do.to(tl.float32)
            inv, dden, m = _row_scales(inv_base, dden_base, rows, q_row, pid_v, NORMALIZE)
            q_g = q.to(tl.float32) * inv[:, None]
            ds += tile_dot(tl.trans(q_g.to(do.dtype)), do, DOT_FP32) * m
            if NORMALIZE:
                dz += tl.sum(q.to(tl.float32) * (dden * m)[:, None], 0)
        for start in range(0, n_k, BLOCK_C):
            pos = start + offs_c
            k_row = pos < n_k
            k = load_rows(k_base, pos, k_row, stride_kn, offs_f, f_mask, stride_kf)
            v = load_rows(v_base, pos, k_row, stride_vn, offs_v, v_mask, stride_vd)
            if DOT_FP32:
                k, v = k.to(tl.float32), v.to(tl.float32)
            dv = tile_dot(k, ds.to(k.dtype), DOT_FP32)
            store_rows(dv_base, pos, k_row, stride_gn, offs_v, v_mask, stride_gd, dv)
            dk = tile_dot(v, tl.trans(ds.to(v.dtype)), DOT_FP32) + dz[None, :]
            store_rows(dk_base, pos, k_row, FEAT, offs_f, f_mask, 1, dk)


# --- host side --------------------------------------------------------------------------------------------------------


def choose_backward_config(feat: int, dv: int, n_tokens: int, chunk_size: int, dtype: torch.dtype) -> LaunchConfig:
    """The forward's tiles (`chunked_linear.choose_config`'s rule), with the chunk shrunk on the GPU to fit.

    A backward program streams four tiles per chunk (phi_q, phi_k: C x BLOCK_F;
    v, dO: C x BLOCK_V) where the forward streams three, and holds two C x C
    tiles (scores and their gradient) and two accumulators (dk, dv) besides the
    state. At the forward's 64-token chunk that spills registers even at
    64 x 64 (and at Based's or Performer's feature dims overflows shared
    memory), so the chunk halves, down to 16, until both estimates fit
    (`_SMEM_BUDGET`, `_LIVE_BUDGET`), and every program gets 8 warps. The value
    block keeps the fp32 state at 8k elements, as the forward, and at 4k for
    fp32 inputs, whose exact-fp32 dots still spilled at 256 features x 32
    values (compiled for sm_90, 3 KB spilled; 0.3 KB at 16 values); one pipeline
    stage, since each chunk's loads are used once. Any chunk gives the same
    gradients (den is exact per row), so it need not be the forward's. Under
    the interpreter the whole problem is one big block: fewer, larger ops are
    what make it fast.
    """
    block_f, block_v = dot_tile(feat), dot_tile(dv)
    block_c = dot_tile(n_tokens, cap=chunk_size)
    if interpreting():
        return LaunchConfig(block_c, block_f, block_v, num_warps=4, num_stages=1)
    size = torch.empty((), dtype=dtype).element_size()
    block_v = min(block_v, max(16, (8192 if size < 4 else 4096) // block_f))

    def smem(c: int) -> int:
        return size * (2 * c * (block_f + block_v) + block_f * block_v + 2 * c * c)

    def live(c: int) -> int:
        # fp32 elements held per program: the state, two C x C tiles, dk/dv-sized accumulators, the loaded tiles.
        return block_f * block_v + 2 * c * c + 2 * c * (block_f + block_v) + size * c * (block_f + block_v) // 2

    while block_c > 16 and (smem(block_c) > _SMEM_BUDGET or live(block_c) > _LIVE_BUDGET):
        block_c //= 2
    return LaunchConfig(block_c, block_f, block_v, num_warps=8, num_stages=1)


def _log_decay_grad(phi_q: torch.Tensor, dq: torch.Tensor, phi_k: torch.Tensor, dk: torch.Tensor) -> torch.Tensor:
    """dL/dlog(lambda) per head, `sum_t t (phi_q_t . dq_t) - sum_s s (phi_k_s . dk_s)`, from the kernels' fp32 dq, dk.

    The two sums are large and nearly cancel (the decay keeps the true
    gradient to short distances t - s, while the weights t, s run to the
    length), so they are formed in fp64 with positions centred on the
    sequence: in fp32 the result loses about ten times more than autograd
    through the chunked reference, whose distances stay within a chunk. Both
    shifts cancel exactly (sum_t phi_q_t . dq_t = sum_s phi_k_s . dk_s). The
    fp64 copies are transient and taken only when log_decay requires grad.
    Query i is token i + n_k - n_q (the caller cut off queries before the first key).
    """
    n_q, n_k = phi_q.shape[2], phi_k.shape[2]
    f64, device = torch.float64, phi_k.device
    centre = (n_k - 1) / 2
    t_pos = torch.arange(n_k - n_q, n_k, device=device, dtype=f64) - centre
    s_pos = torch.arange(n_k, device=device, dtype=f64) - centre
    from_q = torch.linalg.vecdot(phi_q.to(f64), dq.to(f64)) @ t_pos
    from_k = torch.linalg.vecdot(phi_k.to(f64), dk.to(f64)) @ s_pos
    return (from_q - from_k).sum(0)


def chunked_linear_attention_backward(
    grad_out: torch.Tensor,
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    den: torch.Tensor | None,
    causal: bool = False,
    log_decay: torch.Tensor | None = None,
    normalize: bool = True,
    eps: float = 1e-6,
    chunk_size: int = 64,
    decay_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """`(dphi_q, dphi_k, dv, dlog_decay)` of `out = chunked_linear_attention_forward(...)` for `grad_out`.

    Args:
        grad_out, out: `(batch, heads, n_q, Dv)`, any strides; `out` is the forward's output.
        den: the forward's `(batch, heads, n_q)` normaliser (`return_den=True`); None when not normalize.
        phi_q, phi_k, v, causal, log_decay, normalize, eps, chunk_size: the forward's arguments.
        decay_grad: also return log_decay's gradient `(heads,)` (else None).

    Returns:
        Gradients shaped and typed like the inputs (contiguous). Queries that see no key get 0.
    """
    _check_inputs(phi_q, phi_k, v, causal, log_decay, chunk_size)
    batch, heads, n_q, feat = phi_q.shape
    n_k, dv = phi_k.shape[2], v.shape[3]
    for name, t in (("grad_out", grad_out), ("out", out)):
        if t.shape != (batch, heads, n_q, dv):
            raise ValueError(
                f"{name} must be (batch, heads, n_q, Dv) = {(batch, heads, n_q, dv)}, got {tuple(t.shape)}"
            )
    if normalize and (den is None or den.shape != (batch, heads, n_q)):
        got = None if den is None else tuple(den.shape)
        raise ValueError(f"normalize needs the forward's den shaped {(batch, heads, n_q)}, got {got}")
    device, f32 = v.device, torch.float32
    dq = torch.zeros(phi_q.shape, dtype=phi_q.dtype, device=device)
    dvv = torch.zeros(v.shape, dtype=v.dtype, device=device)
    dg = torch.zeros(heads, dtype=log_decay.dtype, device=device) if decay_grad and log_decay is not None else None

    # As the forward: queries before the first key are cut off (their gradient stays 0), the rest is square or wide.
    skip = n_q - n_k if causal and n_q > n_k else 0
    n_qe = n_q - skip
    if n_qe == 0 or n_k == 0:
        return dq, torch.zeros(phi_k.shape, dtype=phi_k.dtype, device=device), dvv, dg
    q_in, do_in, out_in = phi_q[:, :, skip:], grad_out[:, :, skip:], out[:, :, skip:]

    dummy = torch.empty(1, dtype=f32, device=device)
    if normalize:
        den_in = den[:, :, skip:].to(f32)
        inv = 1.0 / den_in.clamp_min(eps)
        delta = torch.empty(batch, heads, n_qe, dtype=f32, device=device)
        block_d = dot_tile(dv)
        block_m = 32 if block_d > 128 else 64
        delta_kernel[(triton.cdiv(n_qe, block_m), batch * heads)](
            out_in, do_in, delta, *out_in.stride(), *do_in.stride(), heads, n_qe,
            HEAD_DIM=dv, BLOCK_M=block_m, BLOCK_D=block_d,
        )  # fmt: skip
        # clamp_min passes the gradient where den >= eps (torch's rule), and blocks it below.
        dden = torch.where(den_in >= eps, -delta * inv, 0.0).contiguous()
        inv = inv.contiguous()
    else:
        inv = dden = dummy
    decay = log_decay.to(device=device, dtype=f32).contiguous() if log_decay is not None else dummy

    cfg = choose_backward_config(feat, dv, max(n_k, n_qe), chunk_size, v.dtype)
    n_vb = triton.cdiv(dv, cfg.block_v)
    grid = (n_vb, batch * heads)
    launch = dict(
        FEAT=feat, DV=dv, BLOCK_C=cfg.block_c, BLOCK_F=cfg.block_f, BLOCK_V=cfg.block_v, CAUSAL=bool(causal),
        HAS_DECAY=log_decay is not None, NORMALIZE=bool(normalize), DOT_FP32=dot_fp32(v.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    dq_part = torch.empty(n_vb, batch * heads, n_qe, feat, dtype=f32, device=device)
    _dq_kernel[grid](
        phi_k, v, do_in, inv, dden, decay, dq_part,
        *phi_k.stride(), *v.stride(), *do_in.stride(),
        heads, n_qe, n_k, **launch,
    )  # fmt: skip
    dk_part = torch.empty(n_vb, batch * heads, n_k, feat, dtype=f32, device=device)
    _dkdv_kernel[grid](
        q_in, phi_k, v, do_in, inv, dden, decay, dk_part, dvv,
        *q_in.stride(), *phi_k.stride(), *v.stride(), *do_in.stride(), *dvv.stride(),
        heads, n_qe, n_k, **launch,
    )  # fmt: skip
    # The partial sums over value blocks (one block, nothing to add, under the interpreter).
    dq_f = (dq_part[0] if n_vb == 1 else dq_part.sum(0)).view(batch, heads, n_qe, feat)
    dk_f = (dk_part[0] if n_vb == 1 else dk_part.sum(0)).view(batch, heads, n_k, feat)
    dq[:, :, skip:] = dq_f
    dk = dk_f.to(phi_k.dtype)

    if dg is not None:
        dg.copy_(_log_decay_grad(q_in, dq_f, phi_k, dk_f))
    return dq, dk, dvv, dg


class ChunkedLinearAttentionFunction(torch.autograd.Function):
    """Autograd node for the Triton kernels: the forward saves its inputs, output and normaliser, not its states.

    Differentiable once (`once_differentiable`): the backward kernels are not themselves differentiated.
    """

    @staticmethod
    def forward(ctx, phi_q, phi_k, v, log_decay, causal: bool, normalize: bool, eps: float, chunk_size: int):
        out, _, den = chunked_linear_attention_forward(
            phi_q, phi_k, v, causal=causal, log_decay=log_decay, normalize=normalize, eps=eps,
            chunk_size=chunk_size, return_den=True,
        )  # fmt: skip
        ctx.save_for_backward(phi_q, phi_k, v, out, den, log_decay)
        ctx.causal, ctx.normalize, ctx.eps, ctx.chunk_size = causal, normalize, eps, chunk_size
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        phi_q, phi_k, v, out, den, log_decay = ctx.saved_tensors
        decay_grad = log_decay is not None and ctx.needs_input_grad[3]
        dq, dk, dv, dg = chunked_linear_attention_backward(
            grad_out, phi_q, phi_k, v, out, den, causal=ctx.causal, log_decay=log_decay, normalize=ctx.normalize,
            eps=ctx.eps, chunk_size=ctx.chunk_size, decay_grad=decay_grad,
        )  # fmt: skip
        return dq, dk, dv, dg, None, None, None, None


def chunked_linear_attention(
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    log_decay: torch.Tensor | None = None,
    normalize: bool = True,
    eps: float = 1e-6,
    chunk_size: int = 64,
) -> torch.Tensor:
    """Linear attention over feature-mapped inputs, differentiable: the forward kernel with a Triton backward.

    Same arguments as `chunked_linear_attention_forward`, without the decode
    states (they get no gradient). When no gradient is needed (torch.no_grad,
    or nothing requires grad) it is exactly the forward kernel: no normaliser
    is stored and nothing is saved, so forward-only timings are the forward's.
    """
    inputs = (phi_q, phi_k, v, log_decay)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        return ChunkedLinearAttentionFunction.apply(phi_q, phi_k, v, log_decay, causal, normalize, eps, chunk_size)
    out, _ = chunked_linear_attention_forward(
        phi_q, phi_k, v, causal=causal, log_decay=log_decay, normalize=normalize, eps=eps, chunk_size=chunk_size
    )
    return out
