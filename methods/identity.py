"""`identity`: the no-mixing baseline. Each position gets its own value back and sees no other token.

A model built on it can only learn what a token says about itself, so on a
recall task it sits at chance: the floor that shows a task needs mixing at
all, and the learning-signal check for trained tasks (a real mixer must beat it).
"""

from __future__ import annotations

import torch

from methods.base import Attention, Capabilities, Shape
from methods.registry import method, register

method(
    "identity",
    family="baseline",
    description="no token mixing: output = v (a floor for trained tasks)",
    source="the trivial baseline (Zoology's learning-signal control)",
    exact=False,
)


@register("identity", "reference", "reference", Capabilities(decode=True), description="returns v unchanged")
class IdentityReference(Attention):
    def forward(self, q, k, v, causal=False):
        n_q = q.shape[-2]
        return v[..., -n_q:, :]  # bottom-right aligned, as every method: query i is token i + (n_k - n_q)

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
