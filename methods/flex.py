"""FlexAttention as every flex peer runs it (dense softmax and the sparse patterns): one compiled function,
BlockMasks cached per pattern and shape.

A helper module: it registers no method. The peers differ only in the mask_mod
they pass (None for dense softmax), so the compile settings, the cache and the
CPU-backward refusal live here once.
"""

from __future__ import annotations

import functools

import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from methods.base import Unsupported
from methods.kernels.layout import LayoutCache
from methods.oracle import MaskMod, with_causal

__all__ = ["compiled_flex", "flex_forward"]

_BLOCK_MASKS = LayoutCache(size=64)


@functools.cache
def compiled_flex():
    """`flex_attention` compiled once per process.

    Dynamo is imported here, not with the module: it costs 1.5-2.5 s, and everything that lists the methods
    (the report, compare, the registry) imports this module without ever compiling.
    """
    import torch._dynamo.config as dynamo_config

    # A sweep compiles one graph per shape and mask; past dynamo's default limit (8) it would
    # silently fall back to eager FlexAttention and time something users never run.
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 256)
    dynamo_config.accumulated_recompile_limit = max(dynamo_config.accumulated_recompile_limit, 4096)
    return torch.compile(flex_attention, dynamic=False)


def flex_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, cache_key: tuple, mask_mod: MaskMod | None
) -> torch.Tensor:
    """FlexAttention (compiled) with a BlockMask of `mask_mod` AND bottom-right causal, cached per
    `cache_key` (the pattern and its parameters) and shape; no BlockMask at all for dense non-causal."""
    if q.device.type == "cpu" and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise Unsupported("FlexAttention has no backward on CPU (torch raises NotImplementedError)")
    n_q, n_k = q.shape[-2], k.shape[-2]
    full = with_causal(mask_mod, n_q, n_k, causal)
    block_mask = None
    if full is not None:
        key = (*cache_key, n_q, n_k, causal, str(q.device))
        block_mask = _BLOCK_MASKS.get(key, lambda: create_block_mask(full, None, None, n_q, n_k, device=str(q.device)))
    return compiled_flex()(q, k, v, block_mask=block_mask)
