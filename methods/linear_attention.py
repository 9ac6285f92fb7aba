"""The linear / recurrent family: softmax(q.k) replaced by phi(q).phi(k), optionally decayed.

One core serves every method here. With feature-mapped queries and keys,
causal attention is a recurrence over a constant-size state,

    S_t = lambda * S_{t-1} + phi(k_t)^T v_t        z_t = lambda * z_{t-1} + phi(k_t)
    o_t = phi(q_t) S_t  [ / phi(q_t).z_t ]

so cost is linear in the length and a decoder keeps (F x Dv + F) numbers per
head instead of a KV cache. The methods differ only in phi, lambda and what
happens to the output:

| method    | phi                                   | decay lambda     | normaliser | after the core          |
| linear    | elu(x) + 1                            | -                | yes        | -                       |
| performer | FAVOR+ positive random features       | -                | yes        | -                       |
| cosformer | relu(x) x [cos, sin](pi/2 * pos / M)  | -                | yes        | -                       |
| based     | 2nd-order Taylor on a projected dim   | -                | yes        | + sliding-window softmax |
| lightning | silu(x)                               | exp(-slope_head) | no         | RMSNorm over head dim   |

Three forms of the core, which the tests hold equal:

* `linear_attention_chunked` (the reference): chunks of C tokens; inside a
  chunk the quadratic masked form (C x C), across chunks the state.
  O(N C (F + Dv) + N F Dv) time, the form GPUs run (fla, Lightning Attention-2) and the one our Triton
  kernel (`methods/kernels/chunked_linear.py`) implements.
* `linear_attention_step` (decode): one token in, O(F Dv), whatever the context.
* `naive_linear_attention` (the oracle): the N x N masked matrix, written plainly.

Conventions shared with the rest of attnbench: SDPA layout; causal is aligned
bottom-right (query i is token i + n_k - n_q), queries before the first key
output 0; the decode state is kept in fp32 (a 16-bit z would overflow past
~65k tokens of positive features).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from methods.base import Attention, Capabilities, Shape, Unsupported, compute_dtype
from methods.feature_maps import (
    CosformerFeatureMap,
    EluFeatureMap,
    FeatureMap,
    PerformerFeatureMap,
    SiluFeatureMap,
    TaylorFeatureMap,
)
from methods.registry import Impl, Param, build, method, register_impls, require_dot_tile, triton_guard

__all__ = [
    "LinearState",
    "alibi_slopes",
    "linear_attention_chunked",
    "linear_attention_state",
    "linear_attention_step",
    "naive_linear_attention",
]

EPS = 1e-6  # normaliser floor: den.clamp_min(EPS); rows with no visible key (num = den = 0) give 0
STATE_DTYPE = torch.float32
# Backward of the chunked form is two matmuls per forward matmul (no recomputation as in FlashAttention's 2.5).
MODE_FACTOR = {"fwd": 1.0, "decode": 1.0, "bwd": 2.0, "fwd_bwd": 3.0}

State = tuple[torch.Tensor, torch.Tensor | None]  # (S (B, H, F, Dv), z (B, H, F) or None), fp32


def _initial(
    initial_state: State | None, b: int, h: int, feat: int, dv: int, normalize: bool, like: torch.Tensor
) -> State:
    dtype = compute_dtype(like.dtype)
    if initial_state is None:
        s = like.new_zeros(b, h, feat, dv, dtype=dtype)
        return s, (like.new_zeros(b, h, feat, dtype=dtype) if normalize else None)
    s, z = initial_state
    if normalize and z is None:
        raise ValueError("a normalised linear attention needs the normaliser z in its initial state")
    return s.to(dtype), (z.to(dtype) if normalize else None)


def linear_attention_chunked(
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    *,
    log_decay: torch.Tensor | None = None,
    normalize: bool = True,
    eps: float = EPS,
    chunk_size: int = 64,
    initial_state: State | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, State | None]:
    """Chunked linear attention in PyTorch (differentiable): the reference every implementation is held to.

    Args:
        phi_q: `(B, H, n_q, F)` feature-mapped queries; phi_k `(B, H, n_k, F)`; v `(B, H, n_k, Dv)`.
        causal: bottom-right aligned (query i is token i + n_k - n_q).
        log_decay: `(H,)` log(lambda) <= 0 per head, or None; causal only.
        normalize: divide by phi(q).z (clamped at `eps`).
        initial_state: `(S, z)` carried in from earlier tokens (decode, or a split sequence).

    Returns:
        `(out (B, H, n_q, Dv) in v's dtype, (S, z) after the last key or None)`. Arithmetic is fp32
        (fp64 for fp64 inputs) whatever the input dtype, as the kernel accumulates.
    """
    if log_decay is not None and not causal:
        raise ValueError("a decayed linear attention is a causal recurrence; non-causal is not defined")
    out_dtype, cdt = v.dtype, compute_dtype(v.dtype)
    q, k, v = phi_q.to(cdt), phi_k.to(cdt), v.to(cdt)
    b, h, n_q, feat = q.shape
    n_k, dv = k.shape[2], v.shape[-1]
    s0, z0 = _initial(initial_state, b, h, feat, dv, normalize, v)

    def done(out: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None):
        return out.to(out_dtype), ((s, z) if output_final_state else None)

    if not causal:
        s = s0 + k.transpose(-1, -2) @ v
        out = q @ s
        z = None
        if normalize:
            z = z0 + k.sum(2)
            out = out / (q @ z.unsqueeze(-1)).clamp_min(eps)
        return done(out, s, z)

    offset = n_k - n_q
    if n_k == 0 or n_q == 0:
        return done(v.new_zeros(b, h, n_q, dv), s0, z0)
    if offset < 0:
        # The first -offset queries come before the first key: they see nothing and output 0.
        tail, state = linear_attention_chunked(
            phi_q[:, :, -offset:], phi_k, v, True, log_decay=log_decay, normalize=normalize, eps=eps,
            chunk_size=chunk_size, initial_state=(s0, z0), output_final_state=output_final_state,
        )  # fmt: skip
        return torch.cat([tail.new_zeros(b, h, -offset, dv), tail], dim=2), state

    c = max(1, min(chunk_size, n_k))
    n_chunks = math.ceil(n_k / c)
    pad = n_chunks * c - n_k
    # Queries placed on the key timeline (query i is token i + offset); rows without a query stay 0.
    qc = F.pad(q, (0, 0, offset, pad)).view(b, h, n_chunks, c, feat)
    kc = F.pad(k, (0, 0, 0, pad)).view(b, h, n_chunks, c, feat)
    vc = F.pad(v, (0, 0, 0, pad)).view(b, h, n_chunks, c, dv)
    t = torch.arange(c, device=v.device)
    dist = t[:, None] - t[None, :]

    scores = qc @ kc.transpose(-1, -2)  # intra-chunk, (B, H, nC, C, C)
    if log_decay is not None:
        g = log_decay.to(device=v.device, dtype=cdt).view(1, h, 1, 1, 1)
        scores = scores * torch.exp(g * dist.clamp_min(0).to(cdt))
        q_in = qc * torch.exp(g * (t + 1).to(cdt)[:, None])  # the state before the chunk, decayed to row t
        k_in = kc * torch.exp(g * (c - 1 - t).to(cdt)[:, None])  # key s decayed to the chunk's end
        chunk_decay = torch.exp(g.view(1, h, 1, 1) * c)
    else:
        q_in, k_in = qc, kc
    scores = scores.masked_fill(dist < 0, 0.0)

    kv = k_in.transpose(-1, -2) @ vc  # each chunk's contribution to the state, (B, H, nC, F, Dv)
    kz = k_in.sum(-2) if normalize else None
    if log_decay is None:
        # States before each chunk: an exclusive prefix sum over chunks.
        s_before = s0.unsqueeze(2) + torch.cat([torch.zeros_like(kv[:, :, :1]), kv[:, :, :-1].cumsum(2)], dim=2)
        if normalize:
            z_before = z0.unsqueeze(2) + torch.cat([torch.zeros_like(kz[:, :, :1]), kz[:, :, :-1].cumsum(2)], dim=2)
    else:
        s_list, z_list, s, z = [], [], s0, z0
        for i in range(n_chunks):
            s_list.append(s)
            s = s * chunk_decay + kv[:, :, i]
            if normalize:
                z_list.append(z)
                z = z * chunk_decay[..., 0] + kz[:, :, i]
        s_before = torch.stack(s_list, dim=2)
        z_before = torch.stack(z_list, dim=2) if normalize else None

    out = q_in @ s_before + scores @ vc
    if normalize:
        den = scores.sum(-1, keepdim=True) + q_in @ z_before.unsqueeze(-1)
        out = out / den.clamp_min(eps)
    out = out.reshape(b, h, n_chunks * c, dv)[:, :, offset:n_k]

    if not output_final_state:
        return out.to(out_dtype), None
    # The last chunk may be short: decay its keys to the last real token, not to the padded end.
    last = n_k - (n_chunks - 1) * c
    k_last, v_last = kc[:, :, -1, :last], vc[:, :, -1, :last]
    s_prev = s_before[:, :, -1]
    z_prev = z_before[:, :, -1] if normalize else None
    if log_decay is not None:
        g = g.view(1, h, 1, 1)
        k_last = k_last * torch.exp(g * (last - 1 - t[:last]).to(cdt)[:, None])
        s_prev = s_prev * torch.exp(g * last)
        z_prev = z_prev * torch.exp(g[..., 0] * last) if normalize else None
    s = s_prev + k_last.transpose(-1, -2) @ v_last
    z = z_prev + k_last.sum(-2) if normalize else None
    return out.to(out_dtype), (s, z)


def linear_attention_state(
    phi_k: torch.Tensor, v: torch.Tensor, *, log_decay: torch.Tensor | None = None, normalize: bool = True
) -> State:
    """(S, z) after the context, in fp32: S = sum_j lambda^(n-1-j) phi(k_j)^T v_j. What prefill hands to decode."""
    cdt = compute_dtype(v.dtype)
    k, v = phi_k.to(cdt), v.to(cdt)
    n = k.shape[2]
    if log_decay is not None:
        age = (n - 1 - torch.arange(n, device=v.device)).to(cdt)
        k = k * torch.exp(log_decay.to(device=v.device, dtype=cdt).view(1, -1, 1, 1) * age[:, None])
    return k.transpose(-1, -2) @ v, (k.sum(2) if normalize else None)


def linear_attention_step(
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    v: torch.Tensor,
    state: State,
    *,
    log_decay: torch.Tensor | None = None,
    normalize: bool = True,
    eps: float = EPS,
) -> tuple[torch.Tensor, State]:
    """The recurrent form for one token (seq 1): O(F x Dv), whatever the context. Returns a new state."""
    cdt = STATE_DTYPE if v.dtype != torch.float64 else torch.float64
    q, k, vv = phi_q[:, :, 0].to(cdt), phi_k[:, :, 0].to(cdt), v[:, :, 0].to(cdt)
    s, z = state
    s, z = s.to(cdt), (z.to(cdt) if z is not None else None)
    if log_decay is not None:
        a = torch.exp(log_decay.to(device=v.device, dtype=cdt)).view(1, -1, 1, 1)
        s = s * a
        z = z * a[..., 0] if normalize else None
    s = s + k.unsqueeze(-1) * vv.unsqueeze(-2)
    out = (q.unsqueeze(-2) @ s).squeeze(-2)
    if normalize:
        z = z + k
        out = out / (q * z).sum(-1, keepdim=True).clamp_min(eps)
    return out.unsqueeze(2).to(v.dtype), (s, z if normalize else None)


def naive_linear_attention(
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    *,
    log_decay: torch.Tensor | None = None,
    normalize: bool = True,
    eps: float = EPS,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """The oracle: the full (n_q x n_k) matrix phi(q) phi(k)^T, masked and decayed, then normalised. Quadratic."""
    q, k, v = phi_q.to(dtype), phi_k.to(dtype), v.to(dtype)
    n_q, n_k = q.shape[2], k.shape[2]
    a = q @ k.transpose(-1, -2)
    if causal:
        dist = (torch.arange(n_q, device=v.device) + (n_k - n_q))[:, None] - torch.arange(n_k, device=v.device)
        a = a.masked_fill(dist < 0, 0.0)
        if log_decay is not None:
            a = a * torch.exp(log_decay.to(device=v.device, dtype=dtype).view(1, -1, 1, 1) * dist.clamp_min(0))
    elif log_decay is not None:
        raise ValueError("decay needs causal")
    out = a @ v
    if normalize:
        out = out / a.sum(-1, keepdim=True).clamp_min(eps)
    return out


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """ALiBi's geometric per-head slopes, which TransNormerLLM / Lightning Attention use as decay rates (H,)."""

    def power_of_2(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(n_heads).is_integer():
        slopes = power_of_2(n_heads)
    else:
        closest = 2 ** math.floor(math.log2(n_heads))
        slopes = power_of_2(closest) + alibi_slopes(2 * closest).tolist()[0::2][: n_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)


@dataclass
class LinearState:
    """What a linear-attention decoder keeps: O(1) in the context length.

    `s`, `z` are fp32 `(B, H, F, Dv)` and `(B, H, F)` (z None without a
    normaliser); `length` is the number of tokens folded in (the next token's
    position); `max_len` is cosformer's M, fixed at prefill; `window` is
    Based's sliding-window cache.
    """

    s: torch.Tensor
    z: torch.Tensor | None
    length: int
    max_len: int | None = None
    window: object = None


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (batch, heads, seq, head_dim), got shape {tuple(t.shape)}")
    if q.shape[:2] != k.shape[:2] or k.shape[:2] != v.shape[:2]:
        raise ValueError(f"batch/heads mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"k and v lengths differ: k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"q and k head dims differ: {q.shape[3]} vs {k.shape[3]}")


def linear_core_flops(n_q: int, n_k: int, feat: int, dv: int, chunk: int, causal: bool, normalize: bool) -> int:
    """FLOPs of the chunked core for one (batch, head), as the reference and the kernel compute it.

    Non-causal: build the state (2 n_k F Dv), read it (2 n_q F Dv). Causal, on
    the key timeline of n_k tokens in chunks of C: a C x C score tile and its
    product with V per chunk (2 n_k C (F + Dv)), the state read by every row
    (2 n_k F Dv) and its update (2 n_k F Dv); the normaliser adds the score row
    sums, phi(q).z, the z update and the division.
    """
    if not causal:
        flops = 2 * n_k * feat * dv + 2 * n_q * feat * dv
        return flops + ((n_k * feat + 2 * n_q * feat + n_q * dv) if normalize else 0)
    c = max(1, min(chunk, n_k))
    flops = 2 * n_k * c * (feat + dv) + 4 * n_k * feat * dv
    return flops + ((n_k * c + 3 * n_k * feat + n_k * dv) if normalize else 0)


def linear_step_flops(feat: int, dv: int, normalize: bool) -> int:
    """One decode token: the rank-1 state update and the read, each 2 F Dv (+ the normaliser's 3F + Dv)."""
    return 4 * feat * dv + ((3 * feat + dv) if normalize else 0)


# --- the methods ---------------------------------------------------------------------------------------------------

REFERENCE_CAPS = Capabilities(decode=True)
# The kernel impls train: the chunked Triton forward has a Triton backward (`methods/kernels/chunked_linear_bwd.py`).
KERNEL_CAPS = Capabilities(decode=True)
_CAUSAL_ONLY = "causal only: lightning's per-head decay is a causal recurrence (TransNormerLLM)"
LIGHTNING_CAPS = Capabilities(non_causal=False, decode=True, note=_CAUSAL_ONLY)
LIGHTNING_KERNEL_CAPS = Capabilities(non_causal=False, decode=True, note=_CAUSAL_ONLY)
# Every method of the family chunks its core and floors its normaliser the same way.
CHUNK_SIZE = Param("chunk_size", int, 64, "tokens per chunk (the kernel needs a power of two >= 16)", min=1)
EPS_PARAM = Param("eps", float, EPS, "normaliser floor: out = phi(q)S / max(phi(q).z, eps)", min=0.0, min_open=True)
SEED = Param("seed", int, 0, "draws the method's projection (the same on every device)")
HEAD_DIM = Param(
    "head_dim", int, None, "null: the projection is created on the first call; set it to create it now", min=1
)
CHUNKED = (CHUNK_SIZE, EPS_PARAM)  # every normalised method ends with these
PROJECTED = (SEED, HEAD_DIM, *CHUNKED)  # and methods with a seeded projection of head_dim with these


class LinearAttentionBase(Attention):
    """Feature map -> chunked core (reference or kernel) -> `_post`. Subclasses set the map, decay and post.

    `computed_pairs` stays the dense count on purpose: every visible key still
    reaches every query through the state, so the `sparsity` column reads 0
    (no key is dropped). What linear attention saves shows in `flops`, which
    counts the chunked algorithm, not a dense equivalent.
    """

    normalize: bool = True

    def __init__(self, chunk_size: int, eps: float):
        super().__init__()
        self.chunk_size, self.eps = chunk_size, eps
        self.feature_map: FeatureMap = EluFeatureMap()

    # --- hooks ------------------------------------------------------------------------------
    def features(self, x: torch.Tensor, is_query: bool, positions: torch.Tensor, max_len: int | None) -> torch.Tensor:
        """phi(x) in the compute dtype (fp32, or fp64 for the oracle); `positions` matter to cosformer only."""
        return self.feature_map(x, is_query=is_query)

    def forward_max_len(self, n_q: int, n_k: int) -> int | None:
        return None

    def prefill_max_len(self, n: int) -> int | None:
        return None

    def log_decay(self, heads: int, device: torch.device) -> torch.Tensor | None:
        return None

    def _post(self, out: torch.Tensor) -> torch.Tensor:
        return out

    def _core(
        self,
        phi_q: torch.Tensor,
        phi_k: torch.Tensor,
        v: torch.Tensor,
        causal: bool,
        log_decay: torch.Tensor | None,
        initial_state: State | None = None,
        output_final_state: bool = False,
    ) -> tuple[torch.Tensor, State | None]:
        return linear_attention_chunked(
            phi_q, phi_k, v, causal, log_decay=log_decay, normalize=self.normalize, eps=self.eps,
            chunk_size=self.chunk_size, initial_state=initial_state, output_final_state=output_final_state,
        )  # fmt: skip

    def _step(
        self, phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor, state: State, log_decay: torch.Tensor | None
    ) -> tuple[torch.Tensor, State]:
        return linear_attention_step(
            phi_q, phi_k, v, state, log_decay=log_decay, normalize=self.normalize, eps=self.eps
        )

    # --- attention -------------------------------------------------------------------------
    def featurize(
        self, q: torch.Tensor, k: torch.Tensor, causal: bool, dtype: torch.dtype | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """phi(q), phi(k) cast to `dtype` (default: the input dtype, what a 16-bit model feeds its kernel)."""
        n_q, n_k = q.shape[2], k.shape[2]
        k_pos = torch.arange(n_k, device=q.device)
        q_pos = torch.arange(n_q, device=q.device) + ((n_k - n_q) if causal else 0)
        max_len = self.forward_max_len(n_q, n_k)
        dtype = dtype or q.dtype
        return self.features(q, True, q_pos, max_len).to(dtype), self.features(k, False, k_pos, max_len).to(dtype)

    def linear_part(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
        _check_qkv(q, k, v)
        phi_q, phi_k = self.featurize(q, k, causal)
        out, _ = self._core(phi_q, phi_k, v, causal, self.log_decay(q.shape[1], q.device))
        return out

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False) -> torch.Tensor:
        return self._post(self.linear_part(q, k, v, causal)).to(q.dtype)

    def naive(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, dtype=torch.float64):
        """The quadratic oracle of this method in `dtype`: same feature map, `naive_linear_attention`, same post."""
        phi_q, phi_k = self.featurize(q.to(dtype), k.to(dtype), causal, dtype=dtype)
        decay = self.log_decay(q.shape[1], q.device)
        out = naive_linear_attention(
            phi_q, phi_k, v, causal, log_decay=decay, normalize=self.normalize, eps=self.eps, dtype=dtype
        )
        return self._post(out)

    # --- decode ----------------------------------------------------------------------------
    def prefill(self, k: torch.Tensor, v: torch.Tensor) -> LinearState:
        n = k.shape[2]
        max_len = self.prefill_max_len(n)
        phi_k = self.features(k, False, torch.arange(n, device=k.device), max_len).to(k.dtype)
        s, z = linear_attention_state(
            phi_k, v, log_decay=self.log_decay(k.shape[1], k.device), normalize=self.normalize
        )
        return LinearState(s.to(STATE_DTYPE), z.to(STATE_DTYPE) if z is not None else None, n, max_len)

    def _linear_step(
        self, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, state: LinearState
    ) -> tuple[torch.Tensor, LinearState]:
        if q.shape[2] != 1 or k_new.shape[2] != 1:
            raise ValueError(f"decode_step takes one token, got q {tuple(q.shape)}, k {tuple(k_new.shape)}")
        pos = torch.tensor([state.length], device=q.device)
        phi_q = self.features(q, True, pos, state.max_len).to(q.dtype)
        phi_k = self.features(k_new, False, pos, state.max_len).to(q.dtype)
        out, (s, z) = self._step(phi_q, phi_k, v_new, (state.s, state.z), self.log_decay(q.shape[1], q.device))
        return out, LinearState(s, z, state.length + 1, state.max_len, state.window)

    def decode_step(
        self, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, state: object
    ) -> tuple[torch.Tensor, object]:
        out, new_state = self._linear_step(q, k_new, v_new, state)
        return self._post(out).to(q.dtype), new_state

    # --- cost model ------------------------------------------------------------------------
    def _post_flops(self, shape: Shape, n_q: int, mode: str) -> int:
        """FLOPs after the core (RMSNorm, Based's window), already scaled for `mode`."""
        return 0

    def flops(self, shape: Shape, mode: str) -> int:
        """Feature map on every query and key + the chunked core (or one recurrent step) + the post-processing."""
        d = shape.head_dim
        feat = self.feature_map.feature_dim(d)
        if mode == "decode":
            n_q, per_head = 1, self.feature_map.flops(2, d) + linear_step_flops(feat, d, self.normalize)
        else:
            n_q = shape.seq_len
            per_head = self.feature_map.flops(shape.seq_len + shape.kv_len, d)
            per_head += linear_core_flops(
                shape.seq_len, shape.kv_len, feat, d, self.chunk_size, shape.causal, self.normalize
            )
        return int(shape.batch * shape.heads * per_head * MODE_FACTOR[mode]) + int(self._post_flops(shape, n_q, mode))

    def state_bytes(self, batch: int, heads: int, context: int, head_dim: int, dtype: torch.dtype) -> int:
        """The recurrent state, F x Dv (+ F for z) per head in fp32 (what decode keeps): independent of `context`."""
        feat = self.feature_map.feature_dim(head_dim)
        per_head = feat * head_dim + (feat if self.normalize else 0)
        return batch * heads * per_head * torch.empty((), dtype=STATE_DTYPE).element_size()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, chunk_size={self.chunk_size}"


class _KernelCore:
    """Mixin: the chunked core and the decode step run the Triton kernel (`methods/kernels/chunked_linear.py`).

    The feature map and `_post` stay in PyTorch (autograd carries the kernel's
    gradients through them); prefill (untimed setup) uses the PyTorch state.
    The core without carried state is the differentiable entry (Triton forward
    and backward, `chunked_linear_bwd.py`), which is exactly the forward kernel
    when no gradient is needed. A decode step is the forward kernel on one token
    with the state as its initial state (states get no gradient), so the kernel
    impl's decode rows time the kernel too.
    """

    def _core(self, phi_q, phi_k, v, causal, log_decay, initial_state=None, output_final_state=False):
        from methods.kernels.chunked_linear import chunked_linear_attention_forward
        from methods.kernels.chunked_linear_bwd import chunked_linear_attention

        require_dot_tile("chunk_size", self.chunk_size)
        if initial_state is None and not output_final_state:
            out = chunked_linear_attention(
                phi_q, phi_k, v, causal=causal, log_decay=log_decay, normalize=self.normalize, eps=self.eps,
                chunk_size=self.chunk_size,
            )  # fmt: skip
            return out, None
        return chunked_linear_attention_forward(
            phi_q, phi_k, v, causal=causal, log_decay=log_decay, normalize=self.normalize, eps=self.eps,
            chunk_size=self.chunk_size, initial_state=initial_state, output_final_state=output_final_state,
        )  # fmt: skip

    def _step(self, phi_q, phi_k, v, state, log_decay):
        return self._core(phi_q, phi_k, v, True, log_decay, initial_state=state, output_final_state=True)


def family_impls(
    reference: str, kernel: str, reference_caps: Capabilities = REFERENCE_CAPS, kernel_caps: Capabilities = KERNEL_CAPS
) -> tuple[Impl, Impl]:
    """A linear method's two implementations: its class as the reference, and with `_KernelCore` as the kernel."""
    return (
        Impl("reference", "reference", reference_caps, description=reference),
        Impl("kernel", "kernel", kernel_caps, guard=triton_guard, description=kernel, mixins=(_KernelCore,)),
    )


# --- linear -----------------------------------------------------------------------------------------------------------

LINEAR_PARAMS = CHUNKED

method("linear", family="linear", exact=False, params=LINEAR_PARAMS,
       description="linear attention, elu(x)+1 features, normalised",
       source='Katharopoulos et al. 2020, "Transformers are RNNs"')  # fmt: skip


class Linear(LinearAttentionBase):
    """phi(x) = elu(x) + 1, the base class's feature map."""


register_impls(
    "linear",
    Linear,
    *family_impls("chunked PyTorch (intra-chunk masked + state)", "chunked Triton (forward and backward)"),
)


# --- performer --------------------------------------------------------------------------------------------------------

PERFORMER_PARAMS = (
    Param("nb_features", int, 256, "m random features (~ d log d at d = 64); the state is m x d per head", min=1),
    *PROJECTED,
)

method("performer", family="linear", exact=False, params=PERFORMER_PARAMS,
       training_free=True,  # FAVOR+ estimates softmax's kernel without bias: the paper swaps it into trained models
       description="FAVOR+ positive orthogonal random features (unbiased estimate of softmax's kernel)",
       source='Choromanski et al. 2021, "Rethinking Attention with Performers"')  # fmt: skip


class Performer(LinearAttentionBase):
    """phi = FAVOR+ positive orthogonal random features, drawn from `seed` (lazily unless `head_dim` is given)."""

    def __init__(self, nb_features: int, seed: int, head_dim: int | None, chunk_size: int, eps: float):
        super().__init__(chunk_size, eps)
        self.feature_map = PerformerFeatureMap(nb_features, seed, head_dim)


register_impls("performer", Performer, *family_impls("FAVOR+ features + chunked PyTorch", "FAVOR+ + chunked Triton"))


# --- cosformer --------------------------------------------------------------------------------------------------------

COSFORMER_PARAMS = (
    Param("max_len", int, None, "M; null: max(n_q, n_k) per call, context + 1 at prefill", min=1),
    *CHUNKED,
)

method("cosformer", family="linear", exact=False, params=COSFORMER_PARAMS,
       description="ReLU features with cos(pi/2 (i-j)/M) re-weighting, as cos/sin feature halves",
       source='Qin et al. 2022, "cosFormer: Rethinking Softmax in Attention"')  # fmt: skip


class Cosformer(LinearAttentionBase):
    """max_len: M (None: max(n_q, n_k) per call, as the paper; at prefill, context + 1).

    The re-weighting cos(pi/2 (i - j) / M) needs one M for every token a state
    has seen, so a decode state fixes M at prefill: with max_len None it is the
    context + 1, which makes one decode step equal the last row of a causal
    forward over context + 1 tokens; generating more tokens needs max_len set.
    """

    def __init__(self, max_len: int | None, chunk_size: int, eps: float):
        super().__init__(chunk_size, eps)
        self.max_len = max_len
        self.feature_map = CosformerFeatureMap()

    def features(self, x, is_query, positions, max_len):
        return self.feature_map(x, is_query=is_query, positions=positions, max_len=max_len)

    def forward_max_len(self, n_q: int, n_k: int) -> int:
        return self.max_len or max(n_q, n_k, 1)

    def prefill_max_len(self, n: int) -> int:
        return self.max_len or n + 1


register_impls(
    "cosformer", Cosformer, *family_impls("cos/sin re-weighted ReLU + chunked PyTorch", "cos/sin folded into F, Triton")
)


# --- lightning --------------------------------------------------------------------------------------------------------

LIGHTNING_PARAMS = (
    Param(
        "decay_scale", float, 1.0, "multiplies the ALiBi slopes (TransNormerLLM's 1 - l/(L-1)); 0: no decay", min=0.0
    ),
    Param("norm_eps", float, 1e-6, "RMSNorm epsilon", min=0.0, min_open=True),
    CHUNK_SIZE,
)

method("lightning", family="linear", exact=False, params=LIGHTNING_PARAMS,
       description="TransNormer NormAttention: silu features, per-head decay, no normaliser, RMSNorm on the output",
       source="Qin et al. 2022 (TransNormer), 2023 (TransNormerLLM), 2024 (Lightning Attention-2)")  # fmt: skip


class Lightning(LinearAttentionBase):
    """decay_scale (0 removes the decay), norm_eps, chunk_size.

    Per-head decay lambda_h = exp(-decay_scale * slope_h) with ALiBi's slopes,
    as TransNormerLLM (whose per-layer factor 1 - l/(L-1) is decay_scale here).
    No softmax and no phi(q).z division: the output is normalised by a
    parameter-free RMSNorm over the head dim instead (TransNormer's NormAttention).
    """

    normalize = False

    def __init__(self, decay_scale: float, norm_eps: float, chunk_size: int):
        super().__init__(chunk_size, EPS)
        self.decay_scale, self.norm_eps = decay_scale, norm_eps
        self.feature_map = SiluFeatureMap()

    def linear_part(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
        if not causal:
            raise Unsupported(f"non-causal attention is not supported ({_CAUSAL_ONLY})")
        return super().linear_part(q, k, v, causal)

    def log_decay(self, heads: int, device: torch.device) -> torch.Tensor:
        return (-self.decay_scale * alibi_slopes(heads)).to(device)

    def _post(self, out: torch.Tensor) -> torch.Tensor:
        x = out.to(compute_dtype(out.dtype))
        return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.norm_eps)).to(out.dtype)

    def _post_flops(self, shape: Shape, n_q: int, mode: str) -> int:
        return int(4 * shape.batch * shape.heads * n_q * shape.head_dim * MODE_FACTOR[mode])


register_impls(
    "lightning",
    Lightning,
    *family_impls("decayed chunked PyTorch + RMSNorm", "decayed chunked Triton", LIGHTNING_CAPS, LIGHTNING_KERNEL_CAPS),
)


# --- based ------------------------------------------------------------------------------------------------------------

BASED_PARAMS = (
    Param("feature_dim", int, 16, "q, k projected to f dims; Taylor features have 1 + f + f(f+1)/2 dims", min=1),
    Param("window", int, 64, "sliding-window size (the paper's 64)", min=1),
    *PROJECTED,
)

method("based", family="linear", exact=False, params=BASED_PARAMS,
       description="2nd-order Taylor linear attention on a projected dim + sliding-window softmax, summed",
       source='Arora et al. 2024, "Simple linear attention language models balance the recall-throughput tradeoff"')  # fmt: skip


class Based(LinearAttentionBase):
    """Taylor linear attention plus an exact sliding window, summed.

    The linear half carries long-range, low-precision recall; the exact
    sliding window carries the local, precise part (Based's hybrid). The window
    is the sparse family's `sliding_window` method with the same impl as this
    one (`reference` or `kernel`), so both halves run the same kind of code.
    """

    def __init__(self, feature_dim: int, window: int, seed: int, head_dim: int | None, chunk_size: int, eps: float):
        super().__init__(chunk_size, eps)
        self.window = window
        self.feature_map = TaylorFeatureMap(feature_dim, seed, head_dim)
        self.window_attn = build("sliding_window", impl=self.kind, window=window)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False) -> torch.Tensor:
        return (self.linear_part(q, k, v, causal) + self.window_attn(q, k, v, causal=causal)).to(q.dtype)

    def naive(self, q, k, v, causal, dtype=torch.float64):
        """Linear half from the quadratic oracle; window half from the window method's reference on `dtype` inputs."""
        linear = super().naive(q, k, v, causal, dtype)
        window = build("sliding_window", impl="reference", window=self.window)
        return linear + window(q.to(dtype), k.to(dtype), v.to(dtype), causal=causal).to(dtype)

    def prefill(self, k: torch.Tensor, v: torch.Tensor) -> LinearState:
        state = super().prefill(k, v)
        state.window = self.window_attn.prefill(k, v)
        return state

    def decode_step(self, q, k_new, v_new, state):
        out, new_state = self._linear_step(q, k_new, v_new, state)
        window_out, new_state.window = self.window_attn.decode_step(q, k_new, v_new, state.window)
        return (out + window_out).to(q.dtype), new_state

    def _post_flops(self, shape: Shape, n_q: int, mode: str) -> int:
        return self.window_attn.flops(shape, mode)

    def state_bytes(self, batch: int, heads: int, context: int, head_dim: int, dtype: torch.dtype) -> int:
        """The linear state plus the window's KV cache (at most `window` tokens)."""
        linear = super().state_bytes(batch, heads, context, head_dim, dtype)
        return linear + self.window_attn.state_bytes(batch, heads, context, head_dim, dtype)


register_impls(
    "based",
    Based,
    *family_impls("Taylor + chunked PyTorch + window reference", "Taylor + chunked Triton + window kernel"),
)
