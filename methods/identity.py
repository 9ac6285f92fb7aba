"""`identity`: the no-mixing baseline. Each position gets its own value back and sees no other token.

A model built on it can only learn what a token says about itself, so on a
recall task it sits at chance: the floor that shows a task needs mixing at
all, and the learning-signal check for trained tasks (a real mixer must beat it).
"""

from __future__ import annotations

import torch

from methods.base import Attention, Capabilities, Shape
from methods.registry import method, register

method("identity", family="baseline", exact=False,
       description="no token mixing: output = v (a floor for trained tasks)",
       source="the trivial baseline (Zoology's learning-signal control)")  # fmt: skip


@register(
    "identity",
    "reference",
    "reference",
    Capabilities(decode=True, grad_inputs=("v",), note="output = v: q and k are never read, so they get no gradient"),
    description="returns v unchanged",
)
class IdentityReference(Attention):
    """The output is v itself: differentiable in v (gradient = the output's), and q and k are not in its graph,
    so autograd returns None for them (`capabilities.grad_inputs` says so; a caller differentiating with
    respect to q or k must pass `allow_unused=True` or ask for `grad_inputs` only)."""

    def forward(self, q, k, v, causal=False):
        # Bottom-right aligned, as every method: query i is token i + (n_k - n_q); a query before the first
        # token has no value of its own and outputs 0, as rows that see no key do everywhere.
        n_q, n_k = q.shape[-2], v.shape[-2]
        if n_q <= n_k:
            return v[..., n_k - n_q :, :]
        return torch.nn.functional.pad(v, (0, 0, n_q - n_k, 0))

    def prefill(self, k: torch.Tensor, v: torch.Tensor) -> object:
        return None  # nothing is kept between tokens

    def decode_step(self, q, k_new, v_new, state):
        return v_new, state

    def computed_pairs(self, n_queries: int, n_keys: int, causal: bool) -> int:
        return 0

    def flops(self, shape: Shape, mode: str) -> int:
        return 0

    def state_bytes(self, batch: int, heads: int, context: int, head_dim: int, dtype: torch.dtype) -> int:
        return 0
