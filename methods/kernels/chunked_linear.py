"""Chunked linear-attention forward in Triton: one kernel for the whole linear family.

Inputs are already feature-mapped (phi(q), phi(k): the map is applied in
PyTorch, so one kernel serves elu+1, FAVOR+, cosformer's cos/sin halves folded
into the feature dim, Based's Taylor features and lightning's silu), plus
flags for what differs between the methods:

* `HAS_DECAY`: a per-head decay lambda = exp(log_decay[h]) (lightning):
  S_t = lambda S_{t-1} + phi(k_t)^T v_t.
* `NORMALIZE`: divide by phi(q).z with z = sum phi(k) (every method but lightning).
* `CAUSAL`: bottom-right aligned; non-causal is a global sum.
* `HAS_INIT` / `STORE_FINAL`: start from a carried-in state and write the state
  after the last key, which is how a decode step runs (one token, the state in,
  the new state out).
* `STORE_DEN`: also write each row's normaliser phi(q).z (before the eps
  clamp), which the backward (`chunked_linear_bwd.py`) needs and would
  otherwise recompute with a second C x C score tile per chunk.

One program owns one (batch, head) and one block of `BLOCK_V` value columns,
and walks the sequence in chunks of `BLOCK_C` tokens with the state
S (BLOCK_F x BLOCK_V, fp32) and z (BLOCK_F, fp32) in registers, as Lightning
Attention-2's forward does. Per chunk (causal):

    o     = (phi_q * decay_q) @ S + mask(phi_q phi_k^T * decay) @ v       inter-chunk + intra-chunk
    den   = rowsum(masked scores) + (phi_q * decay_q) . z                  (NORMALIZE)
    S     = decay^L S + (phi_k * decay_k)^T v ;  z likewise               the chunk folded into the state

Splitting the value dim over programs recomputes the C x C score tile once per
value block: the price of keeping a F x BLOCK_V state in registers when F is
large (Performer's 256 features, Based's 153) and of getting more than B x H
programs in flight. The sequential walk over chunks limits parallelism to
B x H x Dv/BLOCK_V programs: fine at the benchmark's batch x heads, poor for a
single head (a two-pass split, states first then outputs in parallel as fla's
`chunk` kernels do, would fix that).

Conventions are those of `flash_fwd.py`: SDPA layout with any strides, causal
aligned bottom-right (queries before the first key output exactly 0), fp32
accumulation, and `DOT_FP32` under the interpreter, where `tl.dot` on 16-bit
tiles is silently wrong. On the GPU, fp32 inputs use `input_precision="ieee"`
(TF32 would be no more accurate than fp16); 16-bit inputs feed the tensor cores
in their own dtype, the fp32 state cast down for the read as fla does.
The backward lives in `chunked_linear_bwd.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from methods.kernels.common import (
    check_4d,
    check_dtypes_and_device,
    dot_fp32,
    dot_tile,
    head_offsets,
    interpreting,
    is_dot_tile,
    load_rows,
    store_rows,
)

__all__ = [
    "MAX_FEATURE_DIM",
    "MAX_VALUE_DIM",
    "causal_chunk_rows",
    "causal_walk_setup",
    "chunk_offsets",
    "choose_config",
    "chunked_linear_attention_forward",
]

MAX_FEATURE_DIM = 512
MAX_VALUE_DIM = 256

# Configurations `bench.kernel_fit` measured over its spill budget that no tile choice here fixed: reported by
# the check, not failed. sm_80 only: the same tiles spill 0.4 KB on sm_90.
GPU_FIT_KNOWN = [
    (
        "_chunked_linear_fwd_kernel",
        80,
        {"BLOCK_F": 512, "BLOCK_C": 16, "DOT_FP32": False},
        "16-bit decode at 512 padded features (cosformer from head dim 192) spills 1.4 KB on sm_80 "
        "(5.5 KB at 4 warps, 1.8 KB at 16)",
    ),
]


@triton.jit
def chunk_offsets(pid_v, FEAT: tl.constexpr, DV: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_F: tl.constexpr,
                  BLOCK_V: tl.constexpr):  # fmt: skip
    """`(offs_c, offs_f, offs_v, f_mask, v_mask)`: a chunk's rows, the features, and this program's value block.
    BLOCK_F / BLOCK_V are the dims rounded up to powers of two (tl.arange needs them); the pad is masked to 0."""
    offs_f = tl.arange(0, BLOCK_F)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    return tl.arange(0, BLOCK_C), offs_f, offs_v, offs_f < FEAT, offs_v < DV


@triton.jit
def causal_walk_setup(n_q, n_k, LogDecay, off_h, offs_c, HAS_DECAY: tl.constexpr):
    """`(offset, g, keep)` of a causal walk: bottom-right alignment (query i is token i + offset, the wrapper
    makes offset >= 0), the head's log-decay (0 without decay) and the chunk's causal mask (row >= column)."""
    g = 0.0
    if HAS_DECAY:
        g = tl.load(LogDecay + off_h).to(tl.float32)
    return n_k - n_q, g, offs_c[:, None] >= offs_c[None, :]


@triton.jit
def causal_chunk_rows(start, offs_c, n_k, offset):
    """`(pos, k_row, q_idx, q_row)` of the causal chunk at token `start`: its key positions and which are real,
    and the query row at each position (bottom-right alignment: query i is token i + offset) and which exist.
    Rows without a query point at row 0 and are masked: the forward and both backward walks index this way."""
    pos = start + offs_c
    k_row = pos < n_k
    q_idx = pos - offset
    q_row = (q_idx >= 0) & k_row
    return pos, k_row, tl.where(q_row, q_idx, 0), q_row


@triton.jit
def _chunked_linear_fwd_kernel(
    Q, K, V, Out, LogDecay, S0, Z0, S_out, Z_out, Den,
    stride_qz, stride_qh, stride_qm, stride_qf,
    stride_kz, stride_kh, stride_kn, stride_kf,
    stride_vz, stride_vh, stride_vn, stride_vd,
    stride_oz, stride_oh, stride_om, stride_od,
    stride_den, n_heads, n_q, n_k, eps,
    FEAT: tl.constexpr, DV: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_F: tl.constexpr,
    BLOCK_V: tl.constexpr, CAUSAL: tl.constexpr, HAS_DECAY: tl.constexpr, NORMALIZE: tl.constexpr,
    HAS_INIT: tl.constexpr, STORE_FINAL: tl.constexpr, STORE_DEN: tl.constexpr, DOT_FP32: tl.constexpr,
):  # fmt: skip
    """Grid `(cdiv(DV, BLOCK_V), batch * heads)`. States are contiguous fp32 `(B*H, FEAT, DV)` and `(B*H, FEAT)`;
    row `i` of (batch x head) `bh` has its normaliser at `Den + bh * stride_den + i` (fp32, STORE_DEN only)."""
    pid_v = tl.program_id(0)
    off_bh, off_z, off_h = head_offsets(n_heads)
    q_base = Q + off_z * stride_qz + off_h * stride_qh
    k_base = K + off_z * stride_kz + off_h * stride_kh
    v_base = V + off_z * stride_vz + off_h * stride_vh
    o_base = Out + off_z * stride_oz + off_h * stride_oh
    den_base = Den + off_bh.to(tl.int64) * stride_den

    offs_c, offs_f, offs_v, f_mask, v_mask = chunk_offsets(pid_v, FEAT, DV, BLOCK_C, BLOCK_F, BLOCK_V)
    s_offs = off_bh.to(tl.int64) * FEAT * DV + offs_f[:, None] * DV + offs_v[None, :]
    s_mask = f_mask[:, None] & v_mask[None, :]
    z_offs = off_bh.to(tl.int64) * FEAT + offs_f

    s = tl.zeros([BLOCK_F, BLOCK_V], dtype=tl.float32)
    z = tl.zeros([BLOCK_F], dtype=tl.float32)
    if HAS_INIT:
        s = tl.load(S0 + s_offs, mask=s_mask, other=0.0)
        if NORMALIZE:
            z = tl.load(Z0 + z_offs, mask=f_mask, other=0.0)

    if CAUSAL:
        offset, g, keep = causal_walk_setup(n_q, n_k, LogDecay, off_h, offs_c, HAS_DECAY)
        for start in range(0, n_k, BLOCK_C):
            pos, k_row, q_idx, q_row = causal_chunk_rows(start, offs_c, n_k, offset)
            q = load_rows(q_base, q_idx, q_row, stride_qm, offs_f, f_mask, stride_qf)
            k = load_rows(k_base, pos, k_row, stride_kn, offs_f, f_mask, stride_kf)
            v = load_rows(v_base, pos, k_row, stride_vn, offs_v, v_mask, stride_vd)
            if DOT_FP32:
                q = q.to(tl.float32)
                k = k.to(tl.float32)
                v = v.to(tl.float32)
                scores = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                scores = tl.dot(q, tl.trans(k))

            if HAS_DECAY:
                # Row t sees key s of its chunk at distance t - s, and the state before the chunk at t + 1;
                # key s reaches the chunk's last real token (length - 1) at distance length - 1 - s.
                dist = tl.where(keep, offs_c[:, None] - offs_c[None, :], 0).to(tl.float32)
                scores = tl.where(keep, scores * tl.exp(g * dist), 0.0)
                length = tl.minimum(n_k - start, BLOCK_C)
                q_in = q * tl.exp(g * (offs_c + 1).to(tl.float32))[:, None]
                k_scale = tl.where(k_row, tl.exp(g * tl.maximum(length - 1 - offs_c, 0).to(tl.float32)), 0.0)
                k_in = k * k_scale[:, None]
                chunk_decay = tl.exp(g * length.to(tl.float32))
            else:
                scores = tl.where(keep, scores, 0.0)
                q_in = q
                k_in = k
                chunk_decay = 1.0

            if DOT_FP32:
                o = tl.dot(q_in, s, input_precision="ieee")
                o = tl.dot(scores, v, o, input_precision="ieee")
            else:
                o = tl.dot(q_in.to(v.dtype), s.to(v.dtype))
                o = tl.dot(scores.to(v.dtype), v, o)
            if NORMALIZE:
                den = tl.sum(scores, 1) + tl.sum(q_in.to(tl.float32) * z[None, :], 1)
                o = o / tl.maximum(den, eps)[:, None]
                if STORE_DEN:
                    # Every value block computed the same den; the first one writes it.
                    tl.store(den_base + q_idx, den, mask=q_row & (pid_v == 0))
            store_rows(o_base, q_idx, q_row, stride_om, offs_v, v_mask, stride_od, o)

            # Fold the chunk into the state.
            if DOT_FP32:
                s = tl.dot(tl.trans(k_in), v, s * chunk_decay, input_precision="ieee")
            else:
                s = tl.dot(tl.trans(k_in.to(v.dtype)), v, s * chunk_decay)
            if NORMALIZE:
                z = z * chunk_decay + tl.sum(k_in.to(tl.float32), 0)
    else:
        # Non-causal: every query reads the global state, so build it first, then read it.
        for start in range(0, n_k, BLOCK_C):
            pos = start + offs_c
            k_row = pos < n_k
            k = load_rows(k_base, pos, k_row, stride_kn, offs_f, f_mask, stride_kf)
            v = load_rows(v_base, pos, k_row, stride_vn, offs_v, v_mask, stride_vd)
            if DOT_FP32:
                s = tl.dot(tl.trans(k.to(tl.float32)), v.to(tl.float32), s, input_precision="ieee")
            else:
                s = tl.dot(tl.trans(k), v, s)
            if NORMALIZE:
                z += tl.sum(k.to(tl.float32), 0)
        if not DOT_FP32:
            s_read = s.to(V.dtype.element_ty)
        for start in range(0, n_q, BLOCK_C):
            rows = start + offs_c
            q_row = rows < n_q
            q = load_rows(q_base, rows, q_row, stride_qm, offs_f, f_mask, stride_qf)
            if DOT_FP32:
                o = tl.dot(q.to(tl.float32), s, input_precision="ieee")
            else:
                o = tl.dot(q, s_read)
            if NORMALIZE:
                den = tl.sum(q.to(tl.float32) * z[None, :], 1)
                o = o / tl.maximum(den, eps)[:, None]
                if STORE_DEN:
                    tl.store(den_base + rows, den, mask=q_row & (pid_v == 0))
            store_rows(o_base, rows, q_row, stride_om, offs_v, v_mask, stride_od, o)

    if STORE_FINAL:
        tl.store(S_out + s_offs, s, mask=s_mask)
        if NORMALIZE:
            # Every value block computed the same z; the first one writes it.
            tl.store(Z_out + z_offs, z, mask=f_mask & (pid_v == 0))


@dataclass(frozen=True)
class LaunchConfig:
    """Tile sizes and launch parameters for one call (see `choose_config`)."""

    block_c: int
    block_f: int
    block_v: int
    num_warps: int
    num_stages: int


def choose_config(
    feat: int, dv: int, n_tokens: int, chunk_size: int, dtype: torch.dtype, causal: bool = True
) -> LaunchConfig:
    """A fixed heuristic (no autotune under the interpreter).

    The chunk is `chunk_size` (64 by default: the intra-chunk tile feeds the
    tensor cores, and the interpreter's per-op overhead stays low), shrunk for
    short inputs, never below 16 (`tl.dot`'s smallest operand). On the GPU the
    value block is cut so the fp32 state BLOCK_F x BLOCK_V stays at 8k
    elements (32 KB of registers per program); the interpreter takes the whole
    value dim at once, which is fastest there. fp32 inputs (exact `ieee` dots
    on the FMA units, operands in registers) take 16 value columns, 8 warps
    (16 from 256 padded features) and one pipeline stage: compiled for
    sm_80/sm_90 (`bench.kernel_fit`), the 16-bit tiles spilled 3-28 KB per
    program in fp32 and overflowed an A100's shared memory at 512 features;
    these spill under 1 KB. A causal walk from 128 padded features on takes
    32-token chunk tiles on the GPU, 16 from 512 (its q, k and C x C score
    tiles are live together: 64-token tiles spilled 10-14 KB on sm_80 and
    needed 260 KB of shared memory in fp32 at 512 features; 32-token ones
    still spilled 4.4 KB at 512); the outputs are the same for any
    chunk, which only sets how the causal sum is split between the state and
    the explicit tile.
    """
    block_f = dot_tile(feat)
    block_v = dot_tile(dv)
    block_c = dot_tile(n_tokens, cap=chunk_size)
    if interpreting():
        return LaunchConfig(block_c, block_f, block_v, num_warps=4, num_stages=2)
    if causal and block_f >= 128:
        block_c = min(block_c, 16 if block_f >= 512 else 32)
    if dtype == torch.float32:
        return LaunchConfig(block_c, block_f, min(block_v, 16), num_warps=16 if block_f >= 256 else 8, num_stages=1)
    block_v = min(block_v, max(16, 8192 // block_f))
    num_warps = 8 if block_f * block_v > 4096 or block_f >= 256 else 4
    return LaunchConfig(block_c, block_f, block_v, num_warps, num_stages=2)


def _check_inputs(
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    log_decay: torch.Tensor | None,
    chunk_size: int,
) -> None:
    """Raise a one-line ValueError for anything the kernel cannot compute, before launching it."""
    check_4d({"phi_q": phi_q, "phi_k": phi_k, "v": v}, last_dim="dim")
    if phi_q.shape[:2] != phi_k.shape[:2] or phi_k.shape[:2] != v.shape[:2]:
        raise ValueError(
            f"batch/heads mismatch: phi_q {tuple(phi_q.shape)}, phi_k {tuple(phi_k.shape)}, v {tuple(v.shape)}"
        )
    if phi_k.shape[2] != v.shape[2]:
        raise ValueError(f"phi_k and v lengths differ: {tuple(phi_k.shape)}, {tuple(v.shape)}")
    if phi_q.shape[3] != phi_k.shape[3]:
        raise ValueError(f"feature dim mismatch: phi_q {phi_q.shape[3]}, phi_k {phi_k.shape[3]}")
    if not 1 <= phi_q.shape[3] <= MAX_FEATURE_DIM:
        raise ValueError(f"feature dim {phi_q.shape[3]} is not supported; supported range is 1 to {MAX_FEATURE_DIM}")
    if not 1 <= v.shape[3] <= MAX_VALUE_DIM:
        raise ValueError(f"value dim {v.shape[3]} is not supported; supported range is 1 to {MAX_VALUE_DIM}")
    check_dtypes_and_device({"phi_q": phi_q, "phi_k": phi_k, "v": v})
    if not is_dot_tile(chunk_size):
        raise ValueError(f"chunk_size must be a power of two >= 16 for the kernel, got {chunk_size}")
    if log_decay is not None:
        if not causal:
            raise ValueError("a decayed linear attention is a causal recurrence; non-causal is not defined")
        if log_decay.shape != (phi_q.shape[1],):
            raise ValueError(f"log_decay must have shape (heads,) = ({phi_q.shape[1]},), got {tuple(log_decay.shape)}")


def chunked_linear_attention_forward(
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    log_decay: torch.Tensor | None = None,
    normalize: bool = True,
    eps: float = 1e-6,
    chunk_size: int = 64,
    initial_state: tuple[torch.Tensor, torch.Tensor | None] | None = None,
    output_final_state: bool = False,
    return_den: bool = False,
) -> (
    tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor | None] | None]
    | tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor | None] | None, torch.Tensor | None]
):
    """Linear attention over feature-mapped inputs, same contract as `linear_attention_chunked` (the reference).

    Args:
        phi_q: `(batch, heads, n_q, F)`; phi_k `(batch, heads, n_k, F)`; v `(batch, heads, n_k, Dv)`; any strides,
            one dtype (fp32, fp16, bf16).
        causal: bottom-right aligned; queries before the first key output 0.
        log_decay: `(heads,)` log(lambda) <= 0, causal only.
        normalize: divide by max(phi(q).z, eps).
        initial_state: `(S (B, H, F, Dv), z (B, H, F) or None)`, any float dtype (used as fp32).
        output_final_state: also return the fp32 state after the last key.
        return_den: also return each query's normaliser phi(q).z before the eps clamp, `(batch, heads, n_q)`
            fp32 (0 for queries that see no key; None when not normalize): what the backward needs.

    Returns:
        `(out (batch, heads, n_q, Dv) in v's dtype, (S, z) or None)`, and the normaliser last when `return_den`.
    """
    _check_inputs(phi_q, phi_k, v, causal, log_decay, chunk_size)
    batch, heads, n_q, feat = phi_q.shape
    n_k, dv = phi_k.shape[2], v.shape[3]
    device = v.device
    f32 = torch.float32

    if initial_state is not None:
        s0, z0 = initial_state
        if tuple(s0.shape) != (batch, heads, feat, dv):
            raise ValueError(f"initial S must have shape {(batch, heads, feat, dv)}, got {tuple(s0.shape)}")
        if normalize and (z0 is None or tuple(z0.shape) != (batch, heads, feat)):
            raise ValueError(f"initial z must have shape {(batch, heads, feat)} when normalize=True")
        s0 = s0.to(device=device, dtype=f32).contiguous()
        z0 = z0.to(device=device, dtype=f32).contiguous() if normalize else None
    else:
        s0 = z0 = None

    out = torch.empty(batch, heads, n_q, dv, dtype=v.dtype, device=device)
    # Zeros: queries the kernel never visits (before the first key) see no key, so their normaliser is 0.
    den = torch.zeros(batch, heads, n_q, dtype=f32, device=device) if return_den and normalize else None
    q_in, out_view, den_view = phi_q, out, den
    if causal and n_q > n_k:
        # The first n_q - n_k queries sit before the first key: exactly 0, and the kernel sees a square problem.
        out[:, :, : n_q - n_k].zero_()
        q_in, out_view = phi_q[:, :, n_q - n_k :], out[:, :, n_q - n_k :]
        den_view = den[:, :, n_q - n_k :] if den is not None else None

    def done(state: tuple[torch.Tensor, torch.Tensor | None] | None):
        return (out, state, den) if return_den else (out, state)

    def initial_or_zero() -> tuple[torch.Tensor, torch.Tensor | None]:
        if s0 is not None:
            return s0, z0
        z = torch.zeros(batch, heads, feat, dtype=f32, device=device) if normalize else None
        return torch.zeros(batch, heads, feat, dv, dtype=f32, device=device), z

    if n_k == 0:
        # No key: causal queries see nothing; non-causal ones read only the initial state, if any.
        if causal or s0 is None:
            out.zero_()
        else:
            out_ref = phi_q.to(f32) @ s0
            if normalize:
                den_ref = (phi_q.to(f32) @ z0.unsqueeze(-1)).squeeze(-1)
                out_ref = out_ref / den_ref.clamp_min(eps).unsqueeze(-1)
                if den is not None:
                    den.copy_(den_ref)
            out.copy_(out_ref)
        return done(initial_or_zero() if output_final_state else None)
    if out_view.numel() == 0 and not output_final_state:
        return done(None)

    dummy = torch.empty(1, dtype=f32, device=device)
    if q_in.shape[2] == 0:  # only the final state is wanted: no query row is ever loaded or stored
        q_in, out_view = phi_k[:, :, :1], torch.empty(batch, heads, 1, dv, dtype=v.dtype, device=device)
        n_q_eff = 0
    else:
        n_q_eff = q_in.shape[2]
    s_out = torch.empty(batch, heads, feat, dv, dtype=f32, device=device) if output_final_state else dummy
    z_out = torch.empty(batch, heads, feat, dtype=f32, device=device) if output_final_state and normalize else dummy
    decay = log_decay.to(device=device, dtype=f32).contiguous() if log_decay is not None else dummy

    cfg = choose_config(feat, dv, max(n_k, n_q_eff), chunk_size, v.dtype, causal)
    grid = (triton.cdiv(dv, cfg.block_v), batch * heads)
    _chunked_linear_fwd_kernel[grid](
        q_in, phi_k, v, out_view, decay,
        s0 if s0 is not None else dummy, z0 if z0 is not None else dummy, s_out, z_out,
        den_view if den_view is not None and den_view.numel() else dummy,
        *q_in.stride(), *phi_k.stride(), *v.stride(), *out_view.stride(),
        den.stride(1) if den is not None else 0, heads, n_q_eff, n_k, float(eps),
        FEAT=feat,
        DV=dv,
        BLOCK_C=cfg.block_c,
        BLOCK_F=cfg.block_f,
        BLOCK_V=cfg.block_v,
        CAUSAL=bool(causal),
        HAS_DECAY=log_decay is not None,
        NORMALIZE=bool(normalize),
        HAS_INIT=s0 is not None,
        STORE_FINAL=bool(output_final_state),
        STORE_DEN=den is not None,
        DOT_FP32=dot_fp32(v.dtype),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )  # fmt: skip
    return done((s_out, z_out if normalize else None) if output_final_state else None)
