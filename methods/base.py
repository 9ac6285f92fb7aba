"""What every attention implementation promises the runner and the tasks.

A *method* is an algorithm (exact softmax, sliding window, ...); an
*implementation* is one way to run it (the PyTorch reference, our Triton
kernel, or a peer library). Both meet here so that the runner never needs to
know which one it is holding.
"""

from __future__ import annotations

import abc
import math
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
from torch import nn

ImplKind = Literal["reference", "kernel", "peer"]
MODES = ("fwd", "bwd", "fwd_bwd", "decode")
DTYPES = ("float32", "float16", "bfloat16")


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
    dtypes: tuple[str, ...] = DTYPES
    note: str = ""  # why a capability is missing, shown next to the reason

    def as_dict(self) -> dict:
        return asdict(self)

    def check(self, *, causal: bool, cross: bool, mode: str, dtype: str) -> None:
        """Raise `Unsupported` with a one-line reason when the cell is outside these capabilities."""
        why = self.note and f" ({self.note})"
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose from: {', '.join(MODES)}")
        if causal and not self.causal:
            raise Unsupported(f"causal attention is not supported{why}")
        if not causal and not self.non_causal:
            raise Unsupported(f"non-causal attention is not supported{why}")
        if cross and not self.cross:
            raise Unsupported(f"query length != key length is not supported{why}")
        if mode == "decode" and not self.decode:
            raise Unsupported(f"decode is not supported{why}")
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
    extra: dict = field(default_factory=dict)


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

    @abc.abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False) -> torch.Tensor:
        """Attention output, same shape as `q` with `v`'s head dim."""

    def decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        """One new query token (seq 1) against the whole cache; the cache already holds the new key."""
        if not self.capabilities.decode:
            raise Unsupported(f"{self.method}/{self.impl} has no decode")
        return self.forward(q, k_cache, v_cache, causal=True)

    # --- cost model: what the algorithm computes, not a dense equivalent -------------
    def computed_pairs(self, n_queries: int, n_keys: int, causal: bool) -> int:
        return computed_pairs_dense(n_queries, n_keys, causal)

    def flops(self, shape: Shape, mode: str) -> int:
        """FLOPs from the exact computed area: QK^T and PV are 2*D FLOPs per pair each.

        Backward counts 2.5x forward (five matmuls instead of two), as
        FlashAttention's benchmarks do.
        """
        if mode == "decode":
            pairs = self.computed_pairs(1, shape.kv_len, True)
        else:
            pairs = self.computed_pairs(shape.seq_len, shape.kv_len, shape.causal)
        fwd = 4 * shape.batch * shape.heads * pairs * shape.head_dim
        return int(fwd * {"fwd": 1.0, "decode": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}[mode])

    def state_bytes(self, batch: int, heads: int, context: int, head_dim: int, dtype: torch.dtype) -> int:
        """Bytes a decoder keeps per layer at context N: a full KV cache for exact attention."""
        return 2 * batch * heads * context * head_dim * torch.empty((), dtype=dtype).element_size()

    def extra_repr(self) -> str:
        return f"method={self.method}, impl={self.impl}"


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
