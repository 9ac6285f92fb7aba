"""Low-rank attention: Nyströmformer (Xiong et al. 2021) and Linformer (Wang et al. 2020).

Both replace the N x N softmax matrix by a product through a short side of r rows (landmarks for
Nyström, projected keys for Linformer), so time and memory are O(N r d) instead of O(N^2 d). Both need the
whole sequence before the first output (Nyström's landmarks are means over all tokens, Linformer projects
along the whole sequence), so neither has a causal form nor a decode step: their `state_bytes` is what they
keep about the keys (O(r d), independent of N), with the caveat that building it needs every token.

Shared choices:

* **precision.** fp16/bf16 inputs are computed in fp32 (fp64 stays fp64); the output has the input's dtype.
  Nyström's pseudo-inverse iteration multiplies by 7, 13 and 15 and needs the headroom; Linformer's
  projection sums over up to `max_seq_len` tokens.
* **parameters** are `nn.Parameter`s initialised from `seed` as the papers' code does, so trained tasks can
  learn them.
* **kernel impls** compose `methods.kernels.flash_fwd.flash_attention_forward` (our FA2 kernel) with torch
  matmuls; they are forward-only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import MODE_FLOPS_FACTOR, Attention, Capabilities, Shape, Unsupported, compute_dtype, kv_bytes
from methods.registry import Param, method, register, triton_guard

# --- Nyströmformer --------------------------------------------------------------------------------------------

NYSTROM_NOTE = "Nystrom landmarks are means over the whole sequence, so every output depends on future tokens"

NYSTROMFORMER_PARAMS = (
    Param(
        "num_landmarks", int, 64, "m; capped at the sequence length; uneven segments when m does not divide N", min=1
    ),
    Param("pinv_iters", int, 6, "iterations of the Moore-Penrose approximation (the paper's 6)", min=0),
    Param("conv_kernel", int, 0, "0: off; the paper's optional depthwise conv skip on V (33 in its code)", min=0),
    Param("seed", int, 0, "init of the conv skip"),
    Param("heads", int, None, "null: the conv skip is sized on the first call", min=1),
)

method("nystromformer", family="low-rank", exact=False, params=NYSTROMFORMER_PARAMS,
       description="Nystrom approximation of softmax attention with segment-mean landmarks and an iterative pinv",
       source="Xiong et al. 2021, Nystromformer: A Nystrom-Based Algorithm for Approximating Self-Attention")  # fmt: skip


def segment_means(x: torch.Tensor, m: int) -> torch.Tensor:
    """Means of m contiguous segments along the sequence: `(B, H, N, d) -> (B, H, m, d)`, m <= N.

    The paper's code needs N divisible by m. Otherwise we use uneven segments rather than padding (zero
    padding would drag the last landmark towards 0): token t belongs to segment floor(t m / N), so every
    segment has floor(N/m) or ceil(N/m) tokens. When m divides N this is exactly the paper's segmentation.
    """
    b, h, n, d = x.shape
    if n % m == 0:
        return x.reshape(b, h, m, n // m, d).mean(dim=3)
    seg = torch.arange(n, device=x.device) * m // n
    sums = x.new_zeros(b, h, m, d).index_add(2, seg, x)
    counts = torch.bincount(seg, minlength=m).to(x.dtype)
    return sums / counts[:, None]


def iterative_pinv(a: torch.Tensor, iters: int = 6) -> torch.Tensor:
    """Moore-Penrose pseudo-inverse of the landmark kernel by the paper's iteration (its eq. 16).

    `Z_0 = A^T / (||A||_1 ||A||_inf)` and `Z <- Z (13 I - A Z (15 I - A Z (7 I - A Z))) / 4`, third-order
    convergent. A is a softmax matrix (positive, rows sum to 1), so `||A||_inf = 1` and `||A||_1` is its
    largest column sum, taken per (batch, head) (the paper's exact coefficient; its code's "original"
    option takes one max over the whole batch, which couples unrelated sequences).
    """
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    z = a.transpose(-1, -2) / a.sum(dim=-2).amax(dim=-1)[..., None, None]
    for _ in range(iters):
        az = a @ z
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


def _require_one_head_dim(q: torch.Tensor, v: torch.Tensor) -> None:
    """The kernel impls run `flash_attention_forward`, which takes one head dim for q, k and v."""
    if q.shape[-1] != v.shape[-1]:
        raise Unsupported("the flash kernel needs q, k and v to share one head dim")


@register(
    "nystromformer",
    "reference",
    "reference",
    Capabilities(causal=False, decode=False, note=NYSTROM_NOTE),
    description="PyTorch: three softmax kernels against segment-mean landmarks, 6-step iterative pinv",
)
class NystromReference(Attention):
    """`softmax(Q K~^T) pinv(softmax(Q~ K~^T)) softmax(Q~ K^T) V`, with `~` the m segment-mean landmarks.

    Params (conf/method/nystromformer.yaml): `num_landmarks` m (64; capped at min(n_q, n_k)); `pinv_iters`
    (6, as the paper); `conv_kernel` (0 = off; the paper's optional skip connection is a depthwise conv of V
    along the sequence, kernel 33 in its code) and `seed` for the conv's init. The conv has one filter per
    head, sized on the first call (or eagerly with `heads`), and needs n_q == n_k.

    The product is associated right to left, `K1 (pinv(K2) (K3 V))`: O(N m d + m^3) instead of the paper
    code's `(K1 pinv(K2)) (K3 V)` with its extra O(N m^2), same result.
    """

    def __init__(self, num_landmarks: int, pinv_iters: int, conv_kernel: int, seed: int, heads: int | None) -> None:
        super().__init__()
        self.num_landmarks, self.pinv_iters, self.conv_kernel, self.seed = num_landmarks, pinv_iters, conv_kernel, seed
        self.register_parameter("conv_weight", None)
        if self.conv_kernel and heads is not None:
            self._init_conv(heads, torch.device("cpu"))

    def _init_conv(self, heads: int, device: torch.device) -> None:
        """PyTorch's Conv2d default init (kaiming uniform, a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        bound = 1.0 / math.sqrt(self.conv_kernel)
        w = (torch.rand(heads, 1, self.conv_kernel, 1, generator=gen) * 2 - 1) * bound
        self.conv_weight = nn.Parameter(w.to(device))

    def conv_skip(self, v: torch.Tensor) -> torch.Tensor:
        """Depthwise conv of V along the sequence, one filter per head (the paper's `use_conv` skip)."""
        heads = v.shape[1]
        if self.conv_weight is None:
            self._init_conv(heads, v.device)
        elif self.conv_weight.shape[0] != heads:
            raise Unsupported(f"the conv skip was sized for {self.conv_weight.shape[0]} heads, got {heads}")
        pad = (self.conv_kernel // 2, (self.conv_kernel - 1) // 2)  # "same" length for odd and even kernels
        v = F.pad(v, (0, 0, *pad))
        return F.conv2d(v, self.conv_weight.to(v.dtype), groups=heads)

    def landmarks(self, n_q: int, n_k: int) -> int:
        return max(1, min(self.num_landmarks, n_q, n_k))

    def _check(self, q: torch.Tensor, k: torch.Tensor, causal: bool) -> None:
        if causal:
            raise Unsupported(f"causal attention is not supported ({NYSTROM_NOTE})")
        if self.conv_kernel and q.shape[-2] != k.shape[-2]:
            raise Unsupported("the conv skip adds conv(V) to the output, so it needs n_q == n_k")

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, m: int, io_dtype: torch.dtype) -> torch.Tensor:
        """The three kernels in the compute dtype (`io_dtype`, the caller's dtype, serves the kernel impl)."""
        scale = 1.0 / math.sqrt(q.shape[-1])
        q_l, k_l = segment_means(q, m), segment_means(k, m)
        kernel_1 = torch.softmax(q @ k_l.transpose(-1, -2) * scale, dim=-1)  # (n_q, m)
        kernel_2 = torch.softmax(q_l @ k_l.transpose(-1, -2) * scale, dim=-1)  # (m, m)
        kernel_3 = torch.softmax(q_l @ k.transpose(-1, -2) * scale, dim=-1)  # (m, n_k)
        return kernel_1 @ (iterative_pinv(kernel_2, self.pinv_iters) @ (kernel_3 @ v))

    def forward(self, q, k, v, causal=False):
        self._check(q, k, causal)
        if k.shape[-2] == 0 or q.shape[-2] == 0:
            return q.new_zeros(*q.shape[:-1], v.shape[-1])
        dtype = compute_dtype(q.dtype)
        qc, kc, vc = q.to(dtype), k.to(dtype), v.to(dtype)
        out = self._attend(qc, kc, vc, self.landmarks(q.shape[-2], k.shape[-2]), q.dtype)
        if self.conv_kernel:
            out = out + self.conv_skip(vc)
        return out.to(q.dtype)

    # --- cost model ----------------------------------------------------------------------------------------------
    def computed_pairs(self, n_queries: int, n_keys: int, causal: bool) -> int:
        """Score entries evaluated: queries x landmarks, landmarks x landmarks, landmarks x keys."""
        m = self.landmarks(n_queries, n_keys)
        return n_queries * m + m * m + m * n_keys

    def flops(self, shape: Shape, mode: str) -> int:
        """Per head: scores and products of the three kernels (2 d per entry each, except K2 which is only
        scored), `pinv(K2) (K3 V)` 2 m^2 d, and 4 m x m matmuls (8 m^3) per pinv iteration; plus 2 N d k for
        the conv skip when on. Backward counts 2.5x forward, the base class's convention."""
        n_q = 1 if mode == "decode" else shape.seq_len
        n_k, d = shape.kv_len, shape.head_dim
        m = self.landmarks(n_q, n_k)
        per_head = 4 * n_q * m * d + 4 * m * n_k * d + 2 * m * m * d + 2 * m * m * d + 8 * m**3 * self.pinv_iters
        if self.conv_kernel:
            per_head += 2 * n_k * d * self.conv_kernel
        fwd = shape.batch * shape.heads * per_head
        return int(fwd * MODE_FLOPS_FACTOR[mode])

    def state_bytes(self, batch: int, heads: int, context: int, head_dim: int, dtype: torch.dtype) -> int:
        """What answers a new query: the key landmarks K~ and `pinv(K2) K3 V`, m x d each (built from all N)."""
        return kv_bytes(batch, heads, max(1, min(self.num_landmarks, context)), head_dim, dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_landmarks={self.num_landmarks}, pinv_iters={self.pinv_iters}"


@register(
    "nystromformer",
    "kernel",
    "kernel",
    Capabilities(causal=False, decode=False, backward=False, note=f"{NYSTROM_NOTE}; the kernel impl is forward-only"),
    guard=triton_guard,
    description="kernels 1 and 3 through our FA2 Triton kernel, the m x m kernel 2 and its pinv in torch",
)
class NystromKernel(NystromReference):
    """`K3 V = flash(Q~, K, V)` and `K1 X = flash(Q, K~, X)` never form the N x m matrices; only the small
    m x m kernel 2 is materialised (its pinv needs the matrix itself), in torch and fp32."""

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, m: int, io_dtype: torch.dtype) -> torch.Tensor:
        from methods.kernels.flash_fwd import flash_attention_forward

        _require_one_head_dim(q, v)
        scale = 1.0 / math.sqrt(q.shape[-1])
        q_l, k_l = segment_means(q, m), segment_means(k, m)
        kernel_2 = torch.softmax(q_l @ k_l.transpose(-1, -2) * scale, dim=-1)
        # The flash calls run in the caller's dtype (tensor cores for 16-bit); the landmark algebra in fp32.
        k3v = flash_attention_forward(q_l.to(io_dtype), k.to(io_dtype), v.to(io_dtype))
        x = iterative_pinv(kernel_2, self.pinv_iters) @ k3v.to(q.dtype)
        out = flash_attention_forward(q.to(io_dtype), k_l.to(io_dtype), x.to(io_dtype))
        return out.to(q.dtype)


# --- Linformer ------------------------------------------------------------------------------------------------

LINFORMER_NOTE = "Linformer's sequence projection mixes future tokens"
LINFORMER_INITS = ("xavier", "identity")

LINFORMER_PARAMS = (
    Param("k", int, 256, "projected length (the paper's main setting)", min=1),
    Param("max_seq_len", int, 16384, "E, F are (k, max_seq_len); longer key sequences are unsupported", min=1),
    Param("seed", int, 0, "init of E and F"),
    Param(
        "init",
        str,
        "xavier",
        "xavier (the paper's code) | identity (exact softmax when k == N)",
        choices=LINFORMER_INITS,
    ),
)

method("linformer", family="low-rank", exact=False, params=LINFORMER_PARAMS,
       description="softmax attention against keys and values projected along the sequence to k rows",
       source="Wang et al. 2020, Linformer: Self-Attention with Linear Complexity")  # fmt: skip


@register(
    "linformer",
    "reference",
    "reference",
    Capabilities(causal=False, decode=False, note=LINFORMER_NOTE),
    description="PyTorch: E K and F V by matmul, then softmax attention against the k projected rows",
)
class LinformerReference(Attention):
    """`softmax(Q (E K)^T / sqrt(d)) (F V)` with learned `E, F: (k, max_seq_len)`, sliced to the first n_k columns.

    Params (conf/method/linformer.yaml): `k` (256, as the paper's main runs), `max_seq_len` (the longest key
    sequence the projections cover; longer inputs are `unsupported`), `seed`, and `init`: `xavier` is the
    paper code's (fairseq `compress_k`/`compress_v`: xavier_uniform with gain 1/sqrt(2)); `identity` sets
    E = F = the first k rows of the identity, so with k == n_k the op is exact softmax (a test, and a
    sanity check of the plumbing). E and F are shared by the heads (the paper's headwise sharing); inputs
    shorter than `max_seq_len` use the first n_k columns, as fairseq does.
    """

    def __init__(self, k: int, max_seq_len: int, seed: int, init: str) -> None:
        super().__init__()
        self.k, self.max_seq_len, self.seed, self.init = k, max_seq_len, seed, init
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        self.E = nn.Parameter(self._initial(gen))
        self.F = nn.Parameter(self._initial(gen))

    def _initial(self, gen: torch.Generator) -> torch.Tensor:
        if self.init == "identity":
            return torch.eye(self.k, self.max_seq_len)
        bound = (1.0 / math.sqrt(2.0)) * math.sqrt(6.0 / (self.k + self.max_seq_len))
        return (torch.rand(self.k, self.max_seq_len, generator=gen) * 2 - 1) * bound

    def _check(self, n_k: int, causal: bool) -> None:
        if causal:
            raise Unsupported(f"causal attention is not supported ({LINFORMER_NOTE})")
        if n_k > self.max_seq_len:
            raise Unsupported(
                f"{n_k} keys exceed the projection's max_seq_len {self.max_seq_len}; set params.max_seq_len >= {n_k}"
            )

    def project(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(E K, F V): `(B, H, self.k, d)` each, in k's dtype."""
        n = k.shape[-2]
        return self.E[:, :n].to(k.dtype) @ k, self.F[:, :n].to(v.dtype) @ v

    def forward(self, q, k, v, causal=False):
        self._check(k.shape[-2], causal)
        dtype = compute_dtype(q.dtype)
        q, k_p, v_p = q.to(dtype), *self.project(k.to(dtype), v.to(dtype))
        scores = q @ k_p.transpose(-1, -2) / math.sqrt(q.shape[-1])
        return (torch.softmax(scores, dim=-1) @ v_p).to(v.dtype)

    # --- cost model ----------------------------------------------------------------------------------------------
    def computed_pairs(self, n_queries: int, n_keys: int, causal: bool) -> int:
        """Score entries evaluated: every query against the k projected keys."""
        return n_queries * self.k

    def flops(self, shape: Shape, mode: str) -> int:
        """Per head: the two projections (2 k n_k d each) and attention against k rows (4 n_q k d).
        Backward counts 2.5x forward, the base class's convention."""
        n_q = 1 if mode == "decode" else shape.seq_len
        per_head = 4 * self.k * shape.kv_len * shape.head_dim + 4 * n_q * self.k * shape.head_dim
        fwd = shape.batch * shape.heads * per_head
        return int(fwd * MODE_FLOPS_FACTOR[mode])

    def state_bytes(self, batch: int, heads: int, context: int, head_dim: int, dtype: torch.dtype) -> int:
        """The projected keys and values, k x d each (built from all N tokens)."""
        return kv_bytes(batch, heads, self.k, head_dim, dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, k={self.k}, max_seq_len={self.max_seq_len}, init={self.init}"


@register(
    "linformer",
    "kernel",
    "kernel",
    Capabilities(causal=False, decode=False, backward=False, note=f"{LINFORMER_NOTE}; the kernel impl is forward-only"),
    guard=triton_guard,
    description="E K and F V by torch matmuls (fp32), then our FA2 Triton kernel on the k projected keys",
)
class LinformerKernel(LinformerReference):
    def forward(self, q, k, v, causal=False):
        from methods.kernels.flash_fwd import flash_attention_forward

        self._check(k.shape[-2], causal)
        _require_one_head_dim(q, v)
        dtype = compute_dtype(q.dtype)
        k_p, v_p = self.project(k.to(dtype), v.to(dtype))
        return flash_attention_forward(q, k_p.to(q.dtype), v_p.to(q.dtype))
