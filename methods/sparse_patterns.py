"""Fixed sparse-softmax patterns: sliding window, attention sinks + window, Sparse Transformer's strided pattern.

Each pattern is a union of token-level terms (`TokenTerms`), so one class
serves every implementation:

* `reference`: `gathered_attention` over the key blocks the pattern reaches
  from each query tile, plus keys every tile shares (sinks, summary
  columns): O(N * W), differentiable;
* `kernel`: the block-sparse Triton kernel with the same terms as its
  element mask, forward and backward (`methods/kernels/block_sparse_bwd.py`);
* `flex`: FlexAttention with a BlockMask built from the pattern's mask_mod.

FLOPs count the elements inside the pattern (the keys each query actually
attends to), computed per query in closed form, so the reference and kernel
rows report the same count; the kernel's padding inside partial blocks is
not counted.
"""

from __future__ import annotations

import abc

import torch

from methods.base import Attention, Capabilities, NoDecode, kv_bytes
from methods.flex import flex_forward
from methods.kernels.layout import (
    LayoutCache,
    TileGrid,
    TokenTerms,
    build_layout,
    causal_tables,
    interval_count,
    mask_to_lists,
    term_tables,
)
from methods.masks import MaskMod, terms_mask_mod, window_extent
from methods.registry import Impl, Param, method, register_impls, triton_guard
from methods.sparse_decode import StridedCache, WindowCache, attend_contiguous, attend_positions
from methods.sparse_reference import gathered_attention

REFERENCE = Capabilities(decode=True)
# Trainable: the block-sparse kernel has a Triton backward over the same block lists (`block_sparse_bwd.py`).
KERNEL = Capabilities(decode=True)
FLEX = Capabilities(decode=False, note="FlexAttention is compiled per shape and mask; decode is not wired")


def pattern_impls(reference: str, kernel: str, flex: str) -> tuple[Impl, Impl, Impl]:
    """The three implementations every fixed pattern has, with what each does for this pattern."""
    return (
        Impl("reference", "reference", REFERENCE, description=reference),
        Impl("kernel", "kernel", KERNEL, guard=triton_guard, description=kernel),
        Impl("flex", "peer", FLEX, description=flex, mixins=(NoDecode,)),
    )


# --- the shared machinery of fixed patterns ------------------------------------------------


class FixedPattern(Attention):
    """A data-independent pattern run three ways, chosen by the impl's kind: `_reference` (PyTorch),
    `_kernel` (the block-sparse Triton kernel) and `_flex` (the FlexAttention peer).

    The block lists depend on the shape only, so `self.layouts` keeps them per
    shape and device, built on first use, outside the timed calls that follow.
    """

    def __init__(self) -> None:
        super().__init__()
        self.layouts = LayoutCache()

    @abc.abstractmethod
    def _reference(self, q, k, v, causal: bool) -> torch.Tensor:
        """The PyTorch reference: O(N x keys per query), differentiable."""

    @abc.abstractmethod
    def _kernel(self, q, k, v, causal: bool) -> torch.Tensor:
        """The block-sparse Triton kernel on this pattern's block lists."""

    @abc.abstractmethod
    def _flex(self, q, k, v, causal: bool) -> torch.Tensor:
        """FlexAttention with this pattern's mask_mod."""

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

    @abc.abstractmethod
    def terms(self, causal: bool) -> TokenTerms:
        """The pattern as token terms: the kernel's element mask and, through `terms_mask_mod`, the mask_mod."""

    def gathered_terms(self, causal: bool) -> TokenTerms:
        return self.terms(causal)

    def shared_keys(self, n_k: int, device) -> torch.Tensor | None:
        return None

    @abc.abstractmethod
    def row_pairs(self, pos: torch.Tensor, n_k: int, causal: bool) -> torch.Tensor:
        """Keys visible to the query at each position in `pos` (int64 tensor), closed form."""

    @abc.abstractmethod
    def pattern_key(self) -> tuple:
        """The parameters that decide the pattern: the flex BlockMask cache key."""

    def computed_pairs(self, n_queries: int, n_keys: int, causal: bool) -> int:
        pos = torch.arange(n_queries, dtype=torch.long) + (n_keys - n_queries)
        return int(self.row_pairs(pos, n_keys, causal).sum())

    def mask_mod(self, n_q: int, n_k: int, causal: bool) -> MaskMod:
        """The pattern for this shape, without causality (AND it in with `masks.with_causal`)."""
        return terms_mask_mod(self.terms(causal), n_k - n_q)

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
        blocks = self.layouts.get(key, lambda: self._reference_blocks(n_q, n_k, causal, q.device))
        return gathered_attention(
            q, k, v, block=self.ref_block, kv_blocks=blocks, causal=causal,
            mask_mod=self.mask_mod(n_q, n_k, causal), shared_keys=self.shared_keys(n_k, q.device),
        )  # fmt: skip

    def _kernel(self, q, k, v, causal):
        from methods.kernels.block_sparse import kernel_tiles
        from methods.kernels.block_sparse_bwd import block_sparse_attention

        n_q, n_k = q.shape[-2], k.shape[-2]
        tiles = kernel_tiles(n_q, n_k, q.shape[-1], dtype=q.dtype)
        terms = self.terms(causal)
        key = ("kernel", n_q, n_k, tiles, causal, str(q.device))
        grid = TileGrid.bottom_right(n_q, n_k, *tiles)
        layout = self.layouts.get(key, lambda: build_layout(grid, causal, terms, device=q.device))
        return block_sparse_attention(q, k, v, layout, causal=causal, terms=terms)

    def _flex(self, q, k, v, causal):
        n_q, n_k = q.shape[-2], k.shape[-2]
        return flex_forward(q, k, v, causal, (self.method, *self.pattern_key()), self.mask_mod(n_q, n_k, causal))


def _visible_hi(pos: torch.Tensor, n_k: int, causal: bool) -> torch.Tensor:
    """Last key position each query may see (causal and the key bound)."""
    hi = torch.full_like(pos, n_k - 1)
    return torch.minimum(hi, pos) if causal else hi


# --- sliding_window and sink_window: one window cache --------------------------------------

WINDOW = Param(
    "window", int, 256, "causal: the query and the W - 1 keys before it; non-causal: W // 2 each side", min=1
)


class WindowPattern(TokenPattern):
    """`window` keys around the query (see `masks.window_extent`) plus the first `sinks` keys."""

    def __init__(self, window: int, sinks: int):
        super().__init__()
        self.window, self.sinks = window, sinks

    def pattern_key(self) -> tuple:
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
        return WindowCache.from_context(k, v, self.sinks, self.window, extra=extra)

    def decode_step(self, q, k_new, v_new, state):
        cache = state.append(k_new, v_new)
        return attend_contiguous(q, cache.keys, cache.values, self.kind == "kernel"), cache

    def state_bytes(self, batch, heads, context, head_dim, dtype):
        return kv_bytes(batch, heads, min(context, self.sinks + self.window), head_dim, dtype)


SLIDING_WINDOW_PARAMS = (WINDOW,)

method("sliding_window", family="sparse", exact=False, params=SLIDING_WINDOW_PARAMS,
       description="each query sees the previous W keys (causal) or W/2 on each side (non-causal)",
       source="Longformer local attention (Beltagy et al. 2020); Mistral 7B sliding-window attention; neighborhood attention")  # fmt: skip


class SlidingWindow(WindowPattern):
    def __init__(self, window: int):
        super().__init__(window=window, sinks=0)


register_impls(
    "sliding_window",
    SlidingWindow,
    *pattern_impls(
        reference="per-tile gather of the window's key blocks",
        kernel="block-sparse Triton kernel, band mask (forward and backward)",
        flex="FlexAttention, BlockMask from the band mask_mod",
    ),
)

SINK_WINDOW_PARAMS = (
    Param("sinks", int, 4, "leading tokens every query sees (StreamingLLM's 4 attention sinks)", min=0),
    WINDOW,
)

method("sink_window", family="sparse", exact=False, params=SINK_WINDOW_PARAMS,
       description="the first S 'sink' tokens plus a window of recent tokens",
       source="StreamingLLM (Xiao et al. 2023, Efficient Streaming Language Models with Attention Sinks)")  # fmt: skip


class SinkWindow(WindowPattern):
    def __init__(self, sinks: int, window: int):
        super().__init__(window=window, sinks=sinks)


register_impls(
    "sink_window",
    SinkWindow,
    *pattern_impls(
        reference="window gather plus the sinks as shared keys",
        kernel="block-sparse Triton kernel, band | sinks (forward and backward)",
        flex="FlexAttention, BlockMask of band | sinks",
    ),
)


# --- strided: Sparse Transformer's fixed pattern --------------------------------------------

STRIDED_PARAMS = (
    Param("stride", int, 128, "l: the block of keys a query sees whole (the paper's 128 for text)", min=1),
    Param("summary", int, 16, "c: summary columns at the end of every block, at most `stride`", min=0),
)


def _summary_fits(p: dict) -> str | None:
    """Summary columns are the last `summary` keys of a block of `stride`: there cannot be more than `stride`."""
    return None if p["summary"] <= p["stride"] else f"parameter summary must be <= stride, got {p['summary']}"


method("strided", family="sparse", exact=False, params=STRIDED_PARAMS, check=_summary_fits,
       description="Sparse Transformer 'fixed' pattern: the query's own block of `stride` keys + the last `summary` keys of every block",
       source="Child et al. 2019, Generating Long Sequences with Sparse Transformers (fixed attention pattern)")  # fmt: skip


class Strided(TokenPattern):
    """A(i) = {j: j // l == i // l} U {j: j mod l >= l - c}, with l = `stride` and c = `summary` (Child et al., sec. 4.2).

    The summary columns are the same for every query, so the reference
    scores them as one shared key set (O(N * N c / l)) instead of gathering
    the blocks they sit in (O(N^2 / 2) at l = 2 blocks).
    """

    def __init__(self, stride: int, summary: int):
        super().__init__()
        self.stride, self.summary = stride, summary
        self.ref_block = self.stride  # one reference tile = one local block

    def pattern_key(self) -> tuple:
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
        """The summary columns of the finished blocks plus the current block's buffer, allocated whole
        (`stride` slots) as the cache does: what the decoder holds, not only the tokens it has written."""
        return kv_bytes(batch, heads, (context // self.stride) * self.summary + self.stride, head_dim, dtype)


register_impls(
    "strided",
    Strided,
    *pattern_impls(
        reference="local block gather plus summary columns as shared keys",
        kernel="block-sparse Triton kernel, local | columns (forward and backward)",
        flex="FlexAttention, BlockMask of local | columns",
    ),
)
