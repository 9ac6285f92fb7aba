"""Fixed sparse-softmax patterns: sliding window, attention sinks + window, Sparse Transformer's strided pattern.

Each pattern is a union of token-level terms (`TokenTerms`), so one class
serves every implementation:

* `reference`: `gathered_attention` over the key blocks the pattern reaches
  from each query tile, plus keys every tile shares (sinks, summary
  columns): O(N * W), differentiable;
* `kernel`: the block-sparse Triton kernel with the same terms as its
  element mask (forward only);
* `flex`: FlexAttention with a BlockMask built from the pattern's mask_mod.

FLOPs count the elements inside the pattern (the keys each query actually
attends to), computed per query in closed form, so the reference and kernel
rows report the same count; the kernel's padding inside partial blocks is
not counted.
"""

from __future__ import annotations

import torch

from methods.base import Attention, Capabilities, Unsupported
from methods.masks import MaskMod, window_extent, with_causal
from methods.registry import method, package_guard, register, triton_guard
from methods.sparse_decode import StridedCache, WindowCache, attend_contiguous, attend_positions
from methods.sparse_layout import (
    LayoutCache,
    TileGrid,
    TokenTerms,
    build_layout,
    causal_tables,
    interval_count,
    mask_to_lists,
    term_tables,
)
from methods.sparse_reference import gathered_attention

REFERENCE = Capabilities(decode=True)
KERNEL = Capabilities(decode=True, backward=False, note="the block-sparse Triton kernel is forward-only")
FLEX = Capabilities(decode=False, note="FlexAttention is compiled per shape and mask; decode is not wired")
FLEX_GUARD = package_guard("torch.nn.attention.flex_attention", "torch>=2.5")

# --- FlexAttention peers -----------------------------------------------------------------

_FLEX_MASKS: dict[tuple, object] = {}


def flex_forward(q, k, v, causal: bool, cache_key: tuple, mask_mod: MaskMod) -> torch.Tensor:
    """FlexAttention (compiled) with a BlockMask of `mask_mod` AND causal, cached per pattern and shape."""
    if q.device.type == "cpu" and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise Unsupported("FlexAttention has no backward on CPU (torch raises NotImplementedError)")
    from torch.nn.attention.flex_attention import create_block_mask

    from methods.softmax import _compiled_flex

    n_q, n_k = q.shape[-2], k.shape[-2]
    key = (*cache_key, n_q, n_k, causal, str(q.device))
    if key not in _FLEX_MASKS:
        if len(_FLEX_MASKS) >= 64:
            _FLEX_MASKS.clear()
        full = with_causal(mask_mod, n_q, n_k, causal)
        _FLEX_MASKS[key] = create_block_mask(full, None, None, n_q, n_k, device=str(q.device))
    return _compiled_flex()(q, k, v, block_mask=_FLEX_MASKS[key])


# --- the shared machinery of fixed patterns ------------------------------------------------


class FixedPattern(Attention):
    """A data-independent pattern run three ways, chosen by the impl's kind: `_reference` (PyTorch),
    `_kernel` (the block-sparse Triton kernel) and `_flex` (the FlexAttention peer).

    The block lists depend on the shape only, so `_layouts()` keeps them per
    shape and device, built on first use, outside the timed calls that follow.
    """

    def _layouts(self) -> LayoutCache:
        if "_layout_cache" not in self.__dict__:
            self._layout_cache = LayoutCache()
        return self._layout_cache

    def _reference(self, q, k, v, causal):
        raise NotImplementedError

    def _kernel(self, q, k, v, causal):
        raise NotImplementedError

    def _flex(self, q, k, v, causal):
        raise NotImplementedError

    def forward(self, q, k, v, causal=False):
        if self.kind == "kernel":
            return self._kernel(q, k, v, causal)
        if self.kind == "peer":
            return self._flex(q, k, v, causal)
        return self._reference(q, k, v, causal)


class TokenPattern(FixedPattern):
    """A pattern that is a union of token terms; subclasses say which terms and how they decode.

    `gathered_terms` are the terms the reference reaches through per-tile key
    blocks; `shared_keys` are the keys it treats as one set for every tile
    (cheaper when a term is a few columns every query sees).
    """

    ref_block: int = 64

    def terms(self, causal: bool) -> TokenTerms:
        raise NotImplementedError

    def gathered_terms(self, causal: bool) -> TokenTerms:
        return self.terms(causal)

    def shared_keys(self, n_k: int, device) -> torch.Tensor | None:
        return None

    def row_pairs(self, pos: torch.Tensor, n_k: int, causal: bool) -> torch.Tensor:
        """Keys visible to the query at each position in `pos` (int64 tensor), closed form."""
        raise NotImplementedError

    def params(self) -> tuple:
        raise NotImplementedError

    def computed_pairs(self, n_queries: int, n_keys: int, causal: bool) -> int:
        pos = torch.arange(n_queries, dtype=torch.long) + (n_keys - n_queries)
        return int(self.row_pairs(pos, n_keys, causal).sum())

    def mask_mod(self, n_q: int, n_k: int, causal: bool) -> MaskMod:
        """The pattern for this shape, without causality (AND it in with `masks.with_causal`)."""
        return self.terms(causal).mask_mod(n_k - n_q)

    # --- the three ways to run it ---
    def _reference_blocks(self, n_q: int, n_k: int, causal: bool, device) -> torch.Tensor:
        """(1, 1, n_tiles, L) key blocks each reference tile gathers: those its gathered terms reach."""
        grid = TileGrid.bottom_right(n_q, n_k, self.ref_block)
        reach = torch.zeros(grid.n_tiles, grid.n_key_blocks, dtype=torch.bool, device=device)
        for any_, _ in term_tables(self.gathered_terms(causal), grid, device).values():
            reach = reach | any_
        return mask_to_lists(reach & causal_tables(grid, causal, device)[0])[1][None, None]

    def _reference(self, q, k, v, causal):
        n_q, n_k = q.shape[-2], k.shape[-2]
        key = ("reference", n_q, n_k, causal, str(q.device))
        blocks = self._layouts().get(key, lambda: self._reference_blocks(n_q, n_k, causal, q.device))
        return gathered_attention(
            q, k, v, block=self.ref_block, kv_blocks=blocks, causal=causal,
            mask_mod=self.mask_mod(n_q, n_k, causal), shared_keys=self.shared_keys(n_k, q.device),
        )  # fmt: skip

    def _kernel(self, q, k, v, causal):
        from methods.kernels.block_sparse import block_sparse_attention, kernel_tiles

        n_q, n_k = q.shape[-2], k.shape[-2]
        tiles = kernel_tiles(n_q, n_k, q.shape[-1])
        terms = self.terms(causal)
        key = ("kernel", n_q, n_k, tiles, causal, str(q.device))
        grid = TileGrid.bottom_right(n_q, n_k, *tiles)
        layout = self._layouts().get(key, lambda: build_layout(grid, causal, terms, device=q.device))
        return block_sparse_attention(q, k, v, layout, causal=causal, terms=terms)

    def _flex(self, q, k, v, causal):
        n_q, n_k = q.shape[-2], k.shape[-2]
        return flex_forward(q, k, v, causal, (self.method, *self.params()), self.mask_mod(n_q, n_k, causal))


def _visible_hi(pos: torch.Tensor, n_k: int, causal: bool) -> torch.Tensor:
    """Last key position each query may see (causal and the key bound)."""
    hi = torch.full_like(pos, n_k - 1)
    return torch.minimum(hi, pos) if causal else hi


# --- sliding_window and sink_window: one window cache --------------------------------------


class WindowPattern(TokenPattern):
    """`window` keys around the query (see `masks.window_extent`) plus the first `sinks` keys."""

    def __init__(self, window: int = 256, sinks: int = 0):
        super().__init__()
        if window < 1 or sinks < 0:
            raise ValueError(f"window must be >= 1 and sinks >= 0, got window={window}, sinks={sinks}")
        self.window, self.sinks = int(window), int(sinks)

    def params(self) -> tuple:
        return (self.window, self.sinks)

    def terms(self, causal: bool) -> TokenTerms:
        return TokenTerms(band=window_extent(self.window, causal), sinks=self.sinks)

    def gathered_terms(self, causal: bool) -> TokenTerms:
        return TokenTerms(band=window_extent(self.window, causal))

    def shared_keys(self, n_k: int, device) -> torch.Tensor | None:
        return torch.arange(min(self.sinks, n_k), device=device) if self.sinks else None

    def row_pairs(self, pos, n_k, causal):
        left, right = window_extent(self.window, causal)
        hi = _visible_hi(pos, n_k, causal)
        a_lo, a_hi = (pos - left).clamp_min(0), torch.minimum(hi, pos + right)
        s_hi = hi.clamp_max(self.sinks - 1)
        both = interval_count(a_lo, torch.minimum(a_hi, s_hi))
        return interval_count(a_lo, a_hi) + interval_count(torch.zeros_like(pos), s_hi) - both

    # Decode: the sinks and the last `window` tokens, nothing else.
    def prefill(self, k, v, extra: int = 1):
        return WindowCache.from_context(k, v, self.sinks, self.window)

    def decode_step(self, q, k_new, v_new, state):
        cache = state.append(k_new, v_new)
        return attend_contiguous(q, cache.keys, cache.values, self.kind == "kernel"), cache

    def state_bytes(self, batch, heads, context, head_dim, dtype):
        kept = min(context, self.sinks + self.window)
        return 2 * batch * heads * kept * head_dim * torch.empty((), dtype=dtype).element_size()


method(
    "sliding_window",
    family="sparse",
    description="each query sees the previous W keys (causal) or W/2 on each side (non-causal)",
    source="Longformer local attention (Beltagy et al. 2020); Mistral 7B sliding-window attention; neighborhood attention",
    exact=False,
)


class SlidingWindow(WindowPattern):
    def __init__(self, window: int = 256):
        super().__init__(window=window, sinks=0)


@register(
    "sliding_window", "reference", "reference", REFERENCE, description="per-tile gather of the window's key blocks"
)
class SlidingWindowReference(SlidingWindow):
    pass


@register(
    "sliding_window",
    "kernel",
    "kernel",
    KERNEL,
    guard=triton_guard,
    description="block-sparse Triton kernel, band mask",
)
class SlidingWindowKernel(SlidingWindow):
    pass


@register(
    "sliding_window",
    "flex",
    "peer",
    FLEX,
    guard=FLEX_GUARD,
    description="FlexAttention, BlockMask from the band mask_mod",
)
class SlidingWindowFlex(SlidingWindow):
    pass


method(
    "sink_window",
    family="sparse",
    description="the first S 'sink' tokens plus a window of recent tokens",
    source="StreamingLLM (Xiao et al. 2023, Efficient Streaming Language Models with Attention Sinks)",
    exact=False,
)


class SinkWindow(WindowPattern):
    def __init__(self, sinks: int = 4, window: int = 256):
        super().__init__(window=window, sinks=sinks)


@register("sink_window", "reference", "reference", REFERENCE, description="window gather plus the sinks as shared keys")
class SinkWindowReference(SinkWindow):
    pass


@register(
    "sink_window",
    "kernel",
    "kernel",
    KERNEL,
    guard=triton_guard,
    description="block-sparse Triton kernel, band | sinks",
)
class SinkWindowKernel(SinkWindow):
    pass


@register("sink_window", "flex", "peer", FLEX, guard=FLEX_GUARD, description="FlexAttention, BlockMask of band | sinks")
class SinkWindowFlex(SinkWindow):
    pass


# --- strided: Sparse Transformer's fixed pattern --------------------------------------------

method(
    "strided",
    family="sparse",
    description="Sparse Transformer 'fixed' pattern: the query's own block of `stride` keys + the last `summary` keys of every block",
    source="Child et al. 2019, Generating Long Sequences with Sparse Transformers (fixed attention pattern)",
    exact=False,
)


class Strided(TokenPattern):
    """A(i) = {j: j // l == i // l} U {j: j mod l >= l - c}, with l = `stride` and c = `summary` (Child et al., sec. 4.2).

    The summary columns are the same for every query, so the reference
    scores them as one shared key set (O(N * N c / l)) instead of gathering
    the blocks they sit in (O(N^2 / 2) at l = 2 blocks).
    """

    def __init__(self, stride: int = 128, summary: int = 16):
        super().__init__()
        if stride < 1 or not 0 <= summary <= stride:
            raise ValueError(f"need stride >= 1 and 0 <= summary <= stride, got stride={stride}, summary={summary}")
        self.stride, self.summary = int(stride), int(summary)
        self.ref_block = self.stride  # one reference tile = one local block

    def params(self) -> tuple:
        return (self.stride, self.summary)

    def terms(self, causal: bool) -> TokenTerms:
        return TokenTerms(local=self.stride, columns=(self.stride, self.summary) if self.summary else None)

    def gathered_terms(self, causal: bool) -> TokenTerms:
        return TokenTerms(local=self.stride)

    def shared_keys(self, n_k: int, device) -> torch.Tensor | None:
        if not self.summary:
            return None
        cols = torch.arange(n_k, device=device)
        return cols[cols % self.stride >= self.stride - self.summary]

    def _columns_below(self, x: torch.Tensor) -> torch.Tensor:
        """Summary columns among positions [0, x), x >= 0."""
        stride, c = self.stride, self.summary
        return torch.div(x, stride, rounding_mode="floor") * c + (x % stride - (stride - c)).clamp_min(0)

    def row_pairs(self, pos, n_k, causal):
        hi = _visible_hi(pos, n_k, causal)
        start = torch.div(pos, self.stride, rounding_mode="floor") * self.stride
        lo_l, hi_l = start.clamp_min(0), torch.minimum(start + self.stride - 1, hi)
        local = interval_count(lo_l, hi_l)
        cols = self._columns_below(hi.clamp_min(-1) + 1)
        cols_in_local = torch.where(local > 0, self._columns_below(hi_l + 1) - self._columns_below(lo_l), 0)
        return local + cols - cols_in_local

    # Decode: the summary columns of finished blocks and the current block.
    def prefill(self, k, v, extra: int = 1):
        return StridedCache.from_context(k, v, self.stride, self.summary, extra=extra)

    def decode_step(self, q, k_new, v_new, state):
        cache, slots = state.append(k_new, v_new)
        return attend_positions(q, cache.k_buf, cache.v_buf, slots, self.kind == "kernel"), cache

    def state_bytes(self, batch, heads, context, head_dim, dtype):
        kept = (context // self.stride) * self.summary + context % self.stride
        return 2 * batch * heads * kept * head_dim * torch.empty((), dtype=dtype).element_size()


@register(
    "strided", "reference", "reference", REFERENCE, description="local block gather plus summary columns as shared keys"
)
class StridedReference(Strided):
    pass


@register(
    "strided", "kernel", "kernel", KERNEL, guard=triton_guard, description="block-sparse Triton kernel, local | columns"
)
class StridedKernel(Strided):
    pass


@register("strided", "flex", "peer", FLEX, guard=FLEX_GUARD, description="FlexAttention, BlockMask of local | columns")
class StridedFlex(Strided):
    pass
