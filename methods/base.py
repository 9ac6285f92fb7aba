"""What every attention implementation promises the runner and the tasks.

A *method* is an algorithm (exact softmax, sliding window, ...); an
*implementation* is one way to run it (the PyTorch reference, our Triton
kernel, or a peer library). Both meet here so that the runner never needs to
know which one it is holding.
"""

from __future__ import annotations

import abc
import math
from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch import nn

ImplKind = Literal["reference", "kernel", "peer"]
MODES = ("fwd", "bwd", "fwd_bwd", "decode")
DTYPES = ("float32", "float16", "bfloat16")
# FLOPs of each mode relative to one forward pass, the convention of `Attention.flops` (backward 2.5x).
MODE_FLOPS_FACTOR = {"fwd": 1.0, "decode": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}


class Unsupported(Exception):
    """The cell asks for something this implementation cannot do (a row with status `unsupported`)."""


@dataclass(frozen=True)
class Capabilities:
    """CAB's pattern taxonomy (causal or not x self or cross) plus decode and backward."""

    causal: bool = True
    non_causal: bool = True
    cross: bool = True  # query length may differ from key length
    decode: bool = False  # one new query against a KV cache or a recurrent state
    backward: bool = True
    # The inputs the output depends on, so backward gives them a gradient; the others get none (autograd's
    # None, e.g. `identity` returns v and never reads q or k). Differentiate with respect to these only.
    grad_inputs: tuple[str, ...] = ("q", "k", "v")
    dtypes: tuple[str, ...] = DTYPES
    note: str = ""  # why a capability is missing, shown next to the reason

    def as_dict(self) -> dict:
        return asdict(self)

    def check(self, *, causal: bool, cross: bool, mode: str, dtype: str) -> None:
        """Raise `Unsupported` with a one-line reason when the cell is outside these capabilities."""
        why = self.note and f" ({self.note})"
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose from: {', '.join(MODES)}")
        if mode == "decode" and not self.decode:
            raise Unsupported(f"decode is not supported{why}")
        if causal and not self.causal:
            raise Unsupported(f"causal attention is not supported{why}")
        if not causal and not self.non_causal:
            raise Unsupported(f"non-causal attention is not supported{why}")
        if cross and not self.cross:
            raise Unsupported(f"query length != key length is not supported{why}")
        if mode in ("bwd", "fwd_bwd") and not self.backward:
            raise Unsupported(f"backward is not supported{why}")
        if dtype not in self.dtypes:
            raise Unsupported(f"dtype {dtype} is not supported; supported: {', '.join(self.dtypes)}")


def causal_visible_keys(n_queries: int, n_keys: int) -> torch.Tensor:
    """How many keys each query sees under bottom-right causal alignment.

    Query i sits at absolute position i + (n_keys - n_queries), as in decoding
    and FlashAttention: with fewer queries than keys the queries are the last
    tokens; with more, the first queries see nothing and output zeros.
    """
    offset = n_keys - n_queries
    return (torch.arange(n_queries) + offset + 1).clamp(0, n_keys)


def computed_pairs_dense(n_queries: int, n_keys: int, causal: bool) -> int:
    """Query-key pairs an exact method evaluates: N(N+1)/2 for square causal, not N^2/2."""
    if not causal:
        return n_queries * n_keys
    return int(causal_visible_keys(n_queries, n_keys).sum())


@dataclass
class Shape:
    """One attention call's shape, in SDPA's (batch, heads, seq, head_dim) convention."""

    batch: int
    heads: int
    seq_len: int  # queries
    kv_len: int
    head_dim: int
    causal: bool


class Attention(nn.Module, abc.ABC):
    """One implementation of one method. Subclasses override `forward` and, where they can, `decode`.

    `forward(q, k, v, causal)` takes and returns `(batch, heads, seq, head_dim)`
    tensors; it must be differentiable by autograd when `capabilities.backward`.
    """

    method: str = ""
    impl: str = ""
    kind: ImplKind = "reference"
    family: str = ""
    exact: bool = True  # exact methods are held to the oracle's tolerance (status `wrong` otherwise)
    capabilities: Capabilities = Capabilities()

    def __init__(self) -> None:
        """No parameters; a method with parameters takes exactly its declared ones (see `registry.Param`)."""
        super().__init__()

    @abc.abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False) -> torch.Tensor:
        """Attention output, same shape as `q` with `v`'s head dim."""

    # --- decoding: one new token at a time ------------------------------------------
    # `prefill` runs outside the timed call and builds whatever the method keeps between
    # tokens (a KV cache, a window, a recurrent state); `decode_step` is the timed work for
    # one token. decode_step must not mutate the state it is given, so it can be timed repeatedly.

    def prefill(self, k: torch.Tensor, v: torch.Tensor) -> object:
        """State after the context `k, v` (batch, heads, n, d): a KV cache with room for one more token."""
        if not self.capabilities.decode:
            raise Unsupported(f"{self.method}/{self.impl} has no decode")
        return KVCache.from_context(k, v, extra=1)

    def decode_step(
        self, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, state: object
    ) -> tuple[torch.Tensor, object]:
        """Output for the new token (q, k_new, v_new of seq 1) and the state that includes it."""
        if not self.capabilities.decode:
            raise Unsupported(f"{self.method}/{self.impl} has no decode")
        cache = state.append(k_new, v_new)
        return self.forward(q, cache.keys, cache.values, causal=True), cache

    def decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        """One query (seq 1) against a cache whose last entry is the query's own token."""
        state = self.prefill(k_cache[:, :, :-1], v_cache[:, :, :-1])
        return self.decode_step(q, k_cache[:, :, -1:], v_cache[:, :, -1:], state)[0]

    # --- cost model: what the algorithm computes, not a dense equivalent -------------
    def computed_pairs(self, n_queries: int, n_keys: int, causal: bool) -> int:
        return computed_pairs_dense(n_queries, n_keys, causal)

    def flops(self, shape: Shape, mode: str) -> int:
        """FLOPs from the exact computed area: QK^T and PV are 2*D FLOPs per pair each.

        Backward counts 2.5x forward (five matmuls instead of two), as
        FlashAttention's benchmarks do (`MODE_FLOPS_FACTOR`).
        """
        if mode == "decode":
            pairs = self.computed_pairs(1, shape.kv_len, True)
        else:
            pairs = self.computed_pairs(shape.seq_len, shape.kv_len, shape.causal)
        fwd = 4 * shape.batch * shape.heads * pairs * shape.head_dim
        return int(fwd * MODE_FLOPS_FACTOR[mode])

    def state_bytes(self, batch: int, heads: int, context: int, head_dim: int, dtype: torch.dtype) -> int:
        """Bytes a decoder keeps per layer at context N: a full KV cache for exact attention.

        The contract (tests/test_method_contract.py): the tensors reachable from the state that `decode_step`
        returns after `prefill` of N - 1 tokens hold exactly `state_bytes(N)` bytes, buffers counted whole.
        """
        return kv_bytes(batch, heads, context, head_dim, dtype)

    def extra_repr(self) -> str:
        return f"method={self.method}, impl={self.impl}"


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of the references: fp32 for 16-bit inputs (as the kernels accumulate), else the input's."""
    return torch.promote_types(dtype, torch.float32)


class NoDecode:
    """Mixin for an implementation without decode whose method class has one (a peer, a forward-only kernel):
    the base class's `prefill` and `decode_step`, which raise `Unsupported` as its capabilities say."""

    prefill = Attention.prefill
    decode_step = Attention.decode_step


def kv_bytes(batch: int, heads: int, tokens: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes of keys and values for `tokens` tokens: what a KV cache (or a window of one) holds."""
    return 2 * batch * heads * tokens * head_dim * torch.empty((), dtype=dtype).element_size()


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


@dataclass
class KVCache:
    """A preallocated KV cache: writing a token is an O(1) copy into the next slot, as serving engines do."""

    k_buf: torch.Tensor
    v_buf: torch.Tensor
    length: int

    @classmethod
    def from_context(cls, k: torch.Tensor, v: torch.Tensor, extra: int = 1) -> KVCache:
        b, h, n, _ = k.shape
        k_buf = k.new_empty(b, h, n + extra, k.shape[-1])
        v_buf = v.new_empty(b, h, n + extra, v.shape[-1])
        k_buf[:, :, :n] = k
        v_buf[:, :, :n] = v
        return cls(k_buf, v_buf, n)

    @property
    def keys(self) -> torch.Tensor:
        return self.k_buf[:, :, : self.n_valid]

    @property
    def values(self) -> torch.Tensor:
        return self.v_buf[:, :, : self.n_valid]

    @property
    def n_valid(self) -> int:
        """Leading buffer slots that hold tokens (all of them: a full cache evicts nothing)."""
        return self.length

    def append(self, k_new: torch.Tensor, v_new: torch.Tensor) -> KVCache:
        """The cache with the new token in the next slot; `self` still covers only its own tokens."""
        n_new = k_new.shape[-2]
        if self.length + n_new > self.k_buf.shape[-2]:
            raise ValueError(f"KV cache full: {self.length} + {n_new} > capacity {self.k_buf.shape[-2]}")
        self.k_buf[:, :, self.length : self.length + n_new] = k_new
        self.v_buf[:, :, self.length : self.length + n_new] = v_new
        return KVCache(self.k_buf, self.v_buf, self.length + n_new)
