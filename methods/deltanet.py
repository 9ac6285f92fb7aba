"""DeltaNet: linear attention whose state is updated by the delta rule (Yang et al. 2024).

The recurrence, with keys and queries L2-normalised (Schlag et al. 2021; Yang et al. 2024, section 3)::

    S_t = S_{t-1} + beta_t k_t (v_t - S_{t-1}^T k_t)^T        S: (d_k, d_v), starts at 0
    o_t = S_t^T q_t

Written with row vectors (`o_t^T = q_t^T S_t`) so that it reads like `q @ S` on `(..., seq, d)` tensors; it
is the paper's `S_t = S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T` transposed. Where linear attention
only adds `k_t v_t^T`, the delta rule first removes what the state already returns for `k_t`, so a key written
twice is overwritten instead of summed: the reason DeltaNet recalls better than linear attention at the same
state size.

Three forms of the same function live here:

* **chunked** (`delta_rule_chunked`, the reference's forward): the WY/UT form of section 3.2. Inside a chunk
  of C tokens the C rank-1 updates are folded into one: with `A = I + tril(diag(beta) K K^T, -1)`,
  `W = A^{-1} diag(beta) K` and `U = A^{-1} diag(beta) V` (one triangular solve for all chunks at once), the
  chunk's corrected values are `U - W S`, its outputs `Q S + tril(Q K^T) (U - W S)` and the next state
  `S + K^T (U - W S)`. Work is O(N C d + N d^2), linear in N, and the only sequential loop is over N / C
  chunks.
* **recurrent** (`delta_rule_recurrent`, `delta_rule_step`): one token at a time; decoding uses its step,
  O(d_k d_v) per token whatever the context.
* a naive restatement in the tests (`tests/test_deltanet.py`), the oracle both are held against.

Choices the attention-op setting forces (documented because they are ours, not the paper's):

* **beta.** In the paper `beta_t = sigmoid(x_t W_beta)` reads the layer input `x_t`, which an attention op
  does not receive. The closest input it does receive is the raw (pre-normalisation) key, so
  `beta_t = sigmoid(k_t . w_beta)` with one learnable `w_beta` of size d_k shared by the heads (an
  `nn.Parameter`, so trained tasks learn it), initialised as fla's `b_proj` (PyTorch's Linear default,
  U(-1/sqrt(d_k), 1/sqrt(d_k)), no bias) from `seed`. It depends on k only, so the op stays linear in v.
  `w_beta` is sized on the first call unless `head_dim` is given; pass `head_dim` when an optimiser must see
  it before the first forward.
* **feature map.** The paper applies SiLU then L2 normalisation to q and k. L2 normalisation is what keeps
  the recurrence stable (the transition `I - beta k k^T` then has eigenvalues in [1 - beta, 1]), so it is
  always on; the SiLU is a choice of the layer's projections and is optional (`qk_activation: silu`). The
  default `identity` keeps key directions as given, which an untrained op needs to retrieve anything.
* **scale.** `q` is multiplied by `scale` (default 1/sqrt(d_k)) as fla's kernels do.
* **non-causal.** Unsupported: the state depends on the order of the tokens, and neither the paper nor fla
  defines a bidirectional form; reading the final state with every query would be an invention.
* **query length != key length.** Allowed under bottom-right causal alignment (query i is token
  i + n_k - n_q, as everywhere in attnbench): the recurrence runs over the keys and each query reads the
  state at its own position. Queries that precede every key output 0.
* **precision.** fp16/bf16 inputs are computed in fp32 (fp64 stays fp64), as fla keeps its state and
  accumulators in fp32; the output has the input's dtype. The state is fp32, whatever the input dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import MODE_FLOPS_FACTOR, Attention, Capabilities, NoDecode, Shape, Unsupported, compute_dtype
from methods.kernels.wy import wy_factors
from methods.registry import Param, method, register, require_dot_tile, triton_guard

NOTE = "DeltaNet is a causal recurrence: its state depends on token order and no bidirectional form is defined"
QK_ACTIVATIONS = ("identity", "silu")

DELTANET_PARAMS = (
    Param("seed", int, 0, "init of w_beta, the learnable projection beta_t = sigmoid(k_t . w_beta)"),
    Param("chunk_size", int, 64, "tokens per chunk (the paper's 64); the kernel needs a power of two >= 16", min=1),
    Param("head_dim", int, None, "null: w_beta is sized on the first call; set it to create it eagerly", min=1),
    Param("qk_activation", str, "identity", "applied to q and k before their L2 normalisation", choices=QK_ACTIVATIONS),
    Param("scale", float, None, "on q; null: 1/sqrt(head_dim), as fla", min=0.0, min_open=True),
)

method("deltanet", family="linear", exact=False, params=DELTANET_PARAMS,
       description="linear attention with the delta-rule state update, chunkwise parallel (WY/UT form)",
       source="Yang et al. 2024, Parallelizing Linear Transformers with the Delta Rule over Sequence Length")  # fmt: skip


# --- the algorithm, as functions on prepared tensors ---------------------------------------------------------
# q: (B, H, N, d_k), already normalised and scaled; k: (B, H, N, d_k) normalised; v: (B, H, N, d_v);
# beta: (B, H, N); state S: (B, H, d_k, d_v). All in one compute dtype.


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / ||x|| along the last dim, with fla's epsilon inside the square root (a zero vector stays zero)."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def delta_rule_step(
    q: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, state: torch.Tensor
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """One token: `S' = S + beta k (v - S^T k)^T`, `o = S'^T q`; q/k/v are (B, H, d), beta (B, H).

    Returns a new state tensor; `state` is not modified (decode timings call this repeatedly on one state).
    """
    predicted = torch.einsum("bhk,bhkv->bhv", k, state)  # what the state currently returns for k
    delta = beta[..., None] * (v - predicted)
    new_state = state + k[..., :, None] * delta[..., None, :]
    out = None if q is None else torch.einsum("bhk,bhkv->bhv", q, new_state)
    return out, new_state


def delta_rule_recurrent(
    q: torch.Tensor | None,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Token by token: (outputs (B, H, N, d_v) or None when q is None, final state)."""
    b, h, n, d_k = k.shape
    state = k.new_zeros(b, h, d_k, v.shape[-1]) if initial_state is None else initial_state
    outs = []
    for t in range(n):
        o, state = delta_rule_step(None if q is None else q[:, :, t], k[:, :, t], v[:, :, t], beta[:, :, t], state)
        outs.append(o)
    if q is None:
        return None, state
    out = torch.stack(outs, dim=2) if outs else v.new_zeros(b, h, 0, v.shape[-1])
    return out, state


def delta_rule_chunked(
    q: torch.Tensor | None,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    chunk_size: int = 64,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Chunkwise-parallel delta rule: (outputs or None when q is None, final state). Equals the recurrence."""
    b, h, n, d_k = k.shape
    d_v = v.shape[-1]
    state = k.new_zeros(b, h, d_k, d_v) if initial_state is None else initial_state
    if n == 0:
        return (None if q is None else v.new_zeros(b, h, 0, d_v)), state
    kc, w, u = wy_factors(k, v, beta, chunk_size)
    n_chunks = kc.shape[2]
    if q is not None:
        qc = F.pad(q, (0, 0, 0, n_chunks * chunk_size - n)).reshape(b, h, n_chunks, chunk_size, d_k)
        causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).tril()
        # Intra-chunk scores do not depend on the state: all chunks at once, outside the sequential loop.
        scores = (qc @ kc.transpose(-1, -2)).masked_fill(~causal, 0.0)
    outs = []
    for i in range(n_chunks):
        u_i = u[:, :, i] - w[:, :, i] @ state  # the chunk's values minus what the incoming state predicts
        if q is not None:
            outs.append(qc[:, :, i] @ state + scores[:, :, i] @ u_i)
        state = state + kc[:, :, i].transpose(-1, -2) @ u_i
    if q is None:
        return None, state
    return torch.cat(outs, dim=2)[:, :, :n], state


def deltanet_flops(batch: int, heads: int, n: int, d_k: int, d_v: int, chunk_size: int) -> int:
    """Matmul FLOPs of the chunked form over n tokens (padded to whole chunks, as the code computes them).

    Per chunk of C: `diag(beta) K K^T` 2C^2 d_k; the triangular solve for W and U C^2 (d_k + d_v); the
    intra-chunk scores `Q K^T` 2C^2 d_k and their product with the corrected values 2C^2 d_v (full tiles,
    as computed); `W S`, `Q S`, `K^T U'` 2C d_k d_v each. Normalisation and beta are O(N d) and not counted.
    """
    n_chunks = math.ceil(n / chunk_size)
    c = chunk_size
    per_chunk = c * c * (5 * d_k + 3 * d_v) + 6 * c * d_k * d_v
    return batch * heads * n_chunks * per_chunk


# --- the attention op ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeltaState:
    """What DeltaNet keeps between tokens: one (d_k, d_v) matrix per head, whatever the context length."""

    S: torch.Tensor  # (B, H, d_k, d_v), fp32 (fp64 for fp64 inputs)
    length: int  # tokens folded in


def _place_queries(q: torch.Tensor, n_k: int) -> torch.Tensor:
    """Queries laid on the key positions (bottom-right alignment): zero rows where no query sits."""
    n_q = q.shape[-2]
    if n_q == n_k:
        return q
    if n_q < n_k:
        return F.pad(q, (0, 0, n_k - n_q, 0))
    return q[:, :, n_q - n_k :]


def _take_queries(out: torch.Tensor, n_q: int) -> torch.Tensor:
    """Inverse of `_place_queries`: the rows of the real queries; queries before every key output 0."""
    n_k = out.shape[-2]
    if n_q == n_k:
        return out
    if n_q < n_k:
        return out[:, :, n_k - n_q :]
    return F.pad(out, (0, 0, n_q - n_k, 0))


@register(
    "deltanet",
    "reference",
    "reference",
    Capabilities(non_causal=False, decode=True, note=NOTE),
    description="PyTorch: chunked WY/UT form for the forward, recurrent step for decode",
)
class DeltaNetReference(Attention):
    """The chunked form in PyTorch (forward and autograd backward) and the recurrent step for decoding.

    Params (conf/method/deltanet.yaml): `seed` for `w_beta`'s init; `chunk_size` (64, as the paper);
    `head_dim` to size `w_beta` eagerly (None: on the first call); `qk_activation` (`identity` | `silu`)
    before the L2 normalisation; `scale` on q (None: 1/sqrt(d_k)).
    """

    def __init__(self, seed: int, chunk_size: int, head_dim: int | None, qk_activation: str, scale: float | None):
        super().__init__()
        self.seed, self.chunk_size, self.qk_activation, self.scale = seed, chunk_size, qk_activation, scale
        self.register_parameter("w_beta", None)
        if head_dim is not None:
            self._init_beta(head_dim, torch.device("cpu"))

    # --- parameters --------------------------------------------------------------------------------------------
    def _init_beta(self, head_dim: int, device: torch.device) -> None:
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        bound = 1.0 / math.sqrt(head_dim)
        w = (torch.rand(head_dim, generator=gen, dtype=torch.float32) * 2 - 1) * bound
        self.w_beta = nn.Parameter(w.to(device))

    def beta_weight(self, head_dim: int, device: torch.device) -> torch.Tensor:
        if self.w_beta is None:
            self._init_beta(head_dim, device)
        elif self.w_beta.shape[0] != head_dim:
            raise Unsupported(f"w_beta was sized for head_dim {self.w_beta.shape[0]}, got keys of head_dim {head_dim}")
        return self.w_beta

    # --- shared preparation ------------------------------------------------------------------------------------
    def prepare(
        self, q: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(q normalised and scaled, k normalised, v, beta) in the compute dtype."""
        dtype = compute_dtype(k.dtype)
        k = k.to(dtype)
        beta = torch.sigmoid(k @ self.beta_weight(k.shape[-1], k.device).to(dtype))  # from the raw key
        act = F.silu if self.qk_activation == "silu" else (lambda x: x)
        k_n = l2_normalize(act(k))
        q_n = None
        if q is not None:
            scale = 1.0 / math.sqrt(q.shape[-1]) if self.scale is None else self.scale
            q_n = l2_normalize(act(q.to(dtype))) * scale
        return q_n, k_n, v.to(dtype), beta

    def _chunked(self, q, k, v, beta, out_dtype: torch.dtype) -> torch.Tensor:
        return delta_rule_chunked(q, k, v, beta, self.chunk_size)[0].to(out_dtype)

    def forward(self, q, k, v, causal=False):
        if not causal:
            raise Unsupported(f"non-causal attention is not supported ({NOTE})")
        q_n, k_n, v_c, beta = self.prepare(q, k, v)
        out = self._chunked(_place_queries(q_n, k.shape[-2]), k_n, v_c, beta, q.dtype)
        return _take_queries(out, q.shape[-2])

    # --- decoding: the recurrent form ------------------------------------------------------------------------------
    def prefill(self, k: torch.Tensor, v: torch.Tensor) -> DeltaState:
        """The state after the context (chunked, no outputs): O(N) once, outside the timed step."""
        _, k_n, v_c, beta = self.prepare(None, k, v)
        return DeltaState(delta_rule_chunked(None, k_n, v_c, beta, self.chunk_size)[1], k.shape[-2])

    def decode_step(self, q, k_new, v_new, state):
        """One token: update a copy of the state with (k_new, v_new), read it with q. O(d_k d_v), not O(N)."""
        q_n, k_n, v_c, beta = self.prepare(q, k_new, v_new)
        out, new_state = delta_rule_step(q_n[:, :, 0], k_n[:, :, 0], v_c[:, :, 0], beta[:, :, 0], state.S)
        return out[:, :, None].to(q.dtype), DeltaState(new_state, state.length + k_new.shape[-2])

    # --- cost model ----------------------------------------------------------------------------------------------
    def computed_pairs(self, n_queries: int, n_keys: int, causal: bool) -> int:
        """Query-key scores evaluated explicitly: each query sees the keys of its own chunk up to itself;
        everything earlier reaches it through the state. A query at token p (bottom-right) has p mod C + 1."""
        positions = torch.arange(max(0, n_keys - n_queries), n_keys, dtype=torch.int64)
        return int((positions % self.chunk_size + 1).sum())

    def flops(self, shape: Shape, mode: str) -> int:
        """Chunked-form FLOPs over the keys (`deltanet_flops`); decode is one step, 6 d_k d_v per head.

        Backward counts 2.5x forward as the base class does (an estimate: the reference's backward is autograd
        through the same chunked form).
        """
        d = shape.head_dim
        if mode == "decode":
            return shape.batch * shape.heads * 6 * d * d
        fwd = deltanet_flops(shape.batch, shape.heads, shape.kv_len, d, d, self.chunk_size)
        return int(fwd * MODE_FLOPS_FACTOR[mode])

    def state_bytes(self, batch: int, heads: int, context: int, head_dim: int, dtype: torch.dtype) -> int:
        """d_k x d_v per head, independent of the context; kept in fp32 (8 bytes for fp64 inputs)."""
        return batch * heads * head_dim * head_dim * torch.empty((), dtype=compute_dtype(dtype)).element_size()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, chunk_size={self.chunk_size}, qk_activation={self.qk_activation}"


@register(
    "deltanet",
    "kernel",
    "kernel",
    Capabilities(
        non_causal=False,
        decode=False,
        backward=True,
        note=f"{NOTE}; the chunk loop's backward is a Triton kernel, the WY factors' is autograd; decode is the "
        "reference's recurrent step",
    ),
    guard=triton_guard,
    description="WY/UT factors in PyTorch, chunk recurrence and outputs in one Triton kernel (fp32 state)",
)
class DeltaNetKernel(NoDecode, DeltaNetReference):
    """Same parameters and preparation as the reference; the chunk loop runs in `methods/kernels/deltanet_chunk.py`,
    its backward in `deltanet_chunk_bwd.py`.

    The preparation (normalisation, beta from `w_beta`) and the WY factors stay PyTorch under autograd, so their
    gradients (w_beta's included) are autograd's; only the sequential loop over chunks is hand-differentiated.
    No decode: the recurrent step would be the reference's PyTorch (`NoDecode` refuses it).
    """

    def _chunked(self, q, k, v, beta, out_dtype: torch.dtype) -> torch.Tensor:
        from methods.kernels.deltanet_chunk_bwd import deltanet_chunk

        require_dot_tile("chunk_size", self.chunk_size)

        return deltanet_chunk(q, k, v, beta, chunk_size=self.chunk_size, out_dtype=out_dtype)
