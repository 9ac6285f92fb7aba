"""Latency: warm-up, then repeats until a minimum time, every raw sample kept.

On CUDA each repeat is bracketed by events and preceded by an L2 flush (a
write over a buffer larger than any L2), so a kernel is never timed with its
inputs still hot in cache; on CPU, `perf_counter`. Both paths share the loop.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

L2_FLUSH_BYTES = 256 * 2**20  # larger than the L2 of every GPU we profile (H100: 50 MiB, H200: 60 MiB)


class CellTimeout(Exception):
    """A single call took longer than the cell's time limit."""


@dataclass
class TimingConfig:
    warmup: int = 2
    min_time_s: float = 0.3
    min_repeats: int = 3
    max_repeats: int = 100
    timeout_s: float = 120.0  # one call slower than this ends the cell with status `timeout`


@dataclass
class Timing:
    samples_ms: list[float] = field(default_factory=list)
    threads: int = 0

    @property
    def median(self) -> float:
        return statistics.median(self.samples_ms)

    def quantile(self, q: float) -> float:
        """Linear-interpolated quantile of the raw samples (q in [0, 1])."""
        xs = sorted(self.samples_ms)
        pos = q * (len(xs) - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


class _CpuClock:
    def __init__(self) -> None:
        self._start = 0.0

    def before(self) -> None:
        self._start = time.perf_counter()

    def after(self) -> float:
        return (time.perf_counter() - self._start) * 1e3


class _CudaClock:
    def __init__(self, device: torch.device) -> None:
        self._flush = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device=device)
        self._start = torch.cuda.Event(enable_timing=True)
        self._end = torch.cuda.Event(enable_timing=True)

    def before(self) -> None:
        self._flush.zero_()
        self._start.record()

    def after(self) -> float:
        self._end.record()
        torch.cuda.synchronize()
        return self._start.elapsed_time(self._end)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_latency(fn: Callable[[], object], device: torch.device, cfg: TimingConfig | None = None) -> Timing:
    """Time `fn()` until `min_time_s` of samples and at least `min_repeats` (at most `max_repeats`)."""
    cfg = cfg or TimingConfig()
    device = torch.device(device)
    clock = _CudaClock(device) if device.type == "cuda" else _CpuClock()
    for _ in range(cfg.warmup):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        if time.perf_counter() - t0 > cfg.timeout_s:
            raise CellTimeout(f"one call took {time.perf_counter() - t0:.1f} s > timeout_s={cfg.timeout_s}")
    timing = Timing(threads=torch.get_num_threads())
    started = time.perf_counter()
    while len(timing.samples_ms) < cfg.max_repeats:
        clock.before()
        fn()
        timing.samples_ms.append(clock.after())
        if timing.samples_ms[-1] > cfg.timeout_s * 1e3:
            raise CellTimeout(f"one call took {timing.samples_ms[-1] / 1e3:.1f} s > timeout_s={cfg.timeout_s}")
        enough_time = time.perf_counter() - started >= cfg.min_time_s
        if enough_time and len(timing.samples_ms) >= cfg.min_repeats:
            break
    return timing
