"""What sparse methods keep between decode steps, and the one-token attention over it.

A decode step is one new query against what the method kept of its context.
Patterns that never look back past a fixed horizon evict what they will not
need again, so their state is O(window), not O(N):

* `WindowCache`: the first `sinks` tokens plus a ring of the last `window`
  tokens (sliding window: sinks = 0; StreamingLLM: sinks + window).
* `StridedCache`: Sparse Transformer's fixed pattern needs the summary
  columns of finished blocks and the current block only.

Patterns that may look anywhere (BigBird's random blocks, top-k selection)
keep the full `KVCache` and select from it at each step (`attend_positions`).

Like `KVCache`, a step writes only slots the state it is given does not need
(the ring slot of the token that just left the window, slots past its end),
so `decode_step` can be timed repeatedly on the same state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from methods.base import KVCache
from methods.sparse_reference import attend


def attend_positions(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, kernel: bool
) -> torch.Tensor:
    """One query row per (batch, head) over `keys[positions]`.

    `positions` is (L,) shared by every batch and head, or (Bb, Hb, L) with -1
    for unused slots. The kernel path never copies the selected keys (it
    gathers inside `gather_attention`); the reference gathers, then attends.
    """
    if kernel:
        from methods.kernels.block_sparse import gather_attention

        idx = positions.view(1, 1, 1, -1) if positions.dim() == 1 else positions.unsqueeze(-2)
        return gather_attention(q, keys, values, idx)
    if positions.dim() == 1:
        return attend(q, keys[:, :, positions], values[:, :, positions])
    batch, heads = q.shape[:2]
    pos = positions.expand(batch, heads, -1)
    take = pos.clamp_min(0).unsqueeze(-1)
    k_sel = torch.gather(keys, 2, take.expand(-1, -1, -1, keys.shape[-1]))
    v_sel = torch.gather(values, 2, take.expand(-1, -1, -1, values.shape[-1]))
    return attend(q, k_sel, v_sel, keep=(pos >= 0).unsqueeze(-2))


def attend_contiguous(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, kernel: bool) -> torch.Tensor:
    """One query row over every key given (a window's compact cache)."""
    if kernel:
        from methods.kernels.flash_fwd import flash_attention_forward

        return flash_attention_forward(q, keys, values, causal=False)
    return attend(q, keys, values)


@dataclass
class WindowCache(KVCache):
    """The first `sinks` tokens and a ring buffer of the last `window` tokens: O(sinks + window) state.

    Slots `[0, sinks)` hold tokens `0 .. sinks-1`; token `p >= sinks` lives in
    slot `sinks + (p - sinks) % window`. After writing token `p` the valid
    slots are always the prefix `[0, min(p + 1, sinks + window))`: the sinks
    and exactly the window `p - window + 1 .. p` (minus positions that are
    sinks already). Order does not matter to softmax attention.
    """

    # KVCache's `length` counts the tokens seen (the next token has position `length`); slots past
    # `n_valid` hold nothing yet.
    sinks: int
    window: int

    @classmethod
    def from_context(cls, k: torch.Tensor, v: torch.Tensor, sinks: int, window: int, extra: int = 1) -> WindowCache:
        """Keep the sinks and the `window - 1` most recent tokens (what the next step needs).

        The ring holds `sinks + window` slots once the context fills it; before that, only the
        context and room for `extra` more tokens (slot = position until the ring is full), so the
        state is never larger than `state_bytes` says.
        """
        batch, heads, n, _ = k.shape
        cap = min(sinks + window, n + extra)
        k_buf = k.new_zeros(batch, heads, cap, k.shape[-1])
        v_buf = v.new_zeros(batch, heads, cap, v.shape[-1])
        s = min(n, sinks)
        k_buf[:, :, :s], v_buf[:, :, :s] = k[:, :, :s], v[:, :, :s]
        pos = torch.arange(max(sinks, n - (window - 1)), n, device=k.device)
        slots = sinks + (pos - sinks) % window
        k_buf[:, :, slots], v_buf[:, :, slots] = k[:, :, pos], v[:, :, pos]
        return cls(k_buf, v_buf, n, sinks, window)

    def append(self, k_new: torch.Tensor, v_new: torch.Tensor) -> WindowCache:
        pos = self.length
        slot = pos if pos < self.sinks else self.sinks + (pos - self.sinks) % self.window
        if slot >= self.k_buf.shape[-2]:
            raise ValueError(f"window cache full: token {pos} exceeds the capacity it was built with (pass extra=)")
        self.k_buf[:, :, slot] = k_new[:, :, 0]
        self.v_buf[:, :, slot] = v_new[:, :, 0]
        return WindowCache(self.k_buf, self.v_buf, pos + 1, self.sinks, self.window)

    @property
    def n_valid(self) -> int:
        return min(self.length, self.sinks + self.window)


@dataclass
class StridedCache:
    """Sparse Transformer's fixed pattern at decode: summary columns of finished blocks + the current block.

    Buffer slots `[0, col_cap)` hold the columns (`summary` per finished
    block of `stride`), slots `[col_cap, col_cap + stride)` the tokens of the
    current block. When a block completes, its last `summary` tokens are
    copied to the column region, past the end the old state covers.
    """

    k_buf: torch.Tensor
    v_buf: torch.Tensor
    stride: int
    summary: int
    col_cap: int
    length: int

    @classmethod
    def from_context(cls, k: torch.Tensor, v: torch.Tensor, stride: int, summary: int, extra: int = 1) -> StridedCache:
        batch, heads, n, _ = k.shape
        col_cap = ((n + extra) // stride) * summary
        k_buf = k.new_zeros(batch, heads, col_cap + stride, k.shape[-1])
        v_buf = v.new_zeros(batch, heads, col_cap + stride, v.shape[-1])
        done = (n // stride) * stride
        cols = torch.arange(done, device=k.device)
        cols = cols[cols % stride >= stride - summary]
        k_buf[:, :, : cols.numel()], v_buf[:, :, : cols.numel()] = k[:, :, cols], v[:, :, cols]
        k_buf[:, :, col_cap : col_cap + n - done] = k[:, :, done:]
        v_buf[:, :, col_cap : col_cap + n - done] = v[:, :, done:]
        return cls(k_buf, v_buf, stride, summary, col_cap, n)

    @property
    def n_cols(self) -> int:
        return (self.length // self.stride) * self.summary

    def append(self, k_new: torch.Tensor, v_new: torch.Tensor) -> tuple[StridedCache, torch.Tensor]:
        """The state after the new token, and the buffer slots the new token attends to."""
        r = self.length % self.stride
        slot = self.col_cap + r
        self.k_buf[:, :, slot] = k_new[:, :, 0]
        self.v_buf[:, :, slot] = v_new[:, :, 0]
        dev = self.k_buf.device
        slots = torch.cat([torch.arange(self.n_cols, device=dev), torch.arange(self.col_cap, slot + 1, device=dev)])
        if r == self.stride - 1:  # block complete: its summary tokens become columns
            lo = self.n_cols
            if lo + self.summary > self.col_cap:
                raise ValueError(f"strided cache full: {self.length + 1} tokens exceed the capacity it was built with")
            src = slice(self.col_cap + self.stride - self.summary, self.col_cap + self.stride)
            self.k_buf[:, :, lo : lo + self.summary] = self.k_buf[:, :, src]
            self.v_buf[:, :, lo : lo + self.summary] = self.v_buf[:, :, src]
        new = StridedCache(self.k_buf, self.v_buf, self.stride, self.summary, self.col_cap, self.length + 1)
        return new, slots
