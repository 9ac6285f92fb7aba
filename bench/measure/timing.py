"""Latency: warm-up, then repeats until a minimum time, every raw sample kept.

On CUDA each repeat is bracketed by events and preceded by an L2 flush (a
write over a buffer larger than any L2), so a kernel is never timed with its
inputs still hot in cache; on CPU, `perf_counter`. Both paths share the loop.

Several calls (the implementations of one sweep point) are timed in
alternating rounds, A B C A B C ..., not one after another: a burst of load
then hits all of them, so the same-run ratios that compare normalises by
(speed-up over SDPA) stay right even when absolute times do not. One call is
the same loop with a single implementation.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields

import torch

L2_FLUSH_BYTES = 256 * 2**20  # larger than the L2 of every GPU we profile (H100: 50 MiB, H200: 60 MiB)
OUTLIER_RULES = ("none", "iqr")
IQR_FENCE = 1.5  # Tukey's fences: samples beyond Q1 - 1.5 IQR or Q3 + 1.5 IQR are outliers


class CellTimeout(Exception):
    """A single call took longer than the cell's time limit."""


@dataclass
class TimingConfig:
    """How a cell is timed; a suite's `timing:` and the command line's `timing.KEY=...` set these.

    Interference (bench.measure.interference): `probe` times a fixed workload before, between the
    rounds of and after each measurement; slower than `probe_threshold` x its idle figure means
    disturbed, and so does (CPU) a run-queue wait over `wait_threshold` of the timed threads'
    runnable time; disturbed re-measures up to `max_retries` times after a back-off growing from
    `backoff_s`, and flags the rows `noisy` when it stays disturbed.
    """

    warmup: int = 2
    min_time_s: float = 0.3  # per implementation, spread over `rounds` rounds
    min_repeats: int = 3
    max_repeats: int = 100
    timeout_s: float = 120.0  # one call slower than this ends the cell with status `timeout`
    rounds: int = 5  # interleaving: each implementation's samples come in this many alternating blocks
    outliers: str = "none"  # "iqr": median, quantiles and CV over Tukey's fences (raw samples always kept)
    cudagraph: bool = False  # CUDA: time a CUDA-graph replay of the call (small shapes: no launch overhead)
    pause_s: float = 0.0  # sleep between implementations (GPU: lets clocks and temperature settle)
    probe: bool = True
    probe_threshold: float = 1.3
    wait_threshold: float = 0.1  # fraction of runnable time the timed threads waited for a core (CPU)
    max_retries: int = 2
    backoff_s: float = 0.5

    def __post_init__(self) -> None:
        if self.outliers not in OUTLIER_RULES:
            raise ValueError(f"timing.outliers must be one of: {', '.join(OUTLIER_RULES)}; got {self.outliers!r}")
        for name in ("warmup", "min_repeats", "max_repeats", "rounds", "max_retries"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name in ("warmup", "max_retries") else 1):
                raise ValueError(f"timing.{name} must be an integer >= {0 if name in ('warmup', 'max_retries') else 1}, got {value!r}")
        if self.max_repeats < self.min_repeats:
            raise ValueError(f"timing.max_repeats ({self.max_repeats}) < timing.min_repeats ({self.min_repeats})")
        for name in ("min_time_s", "pause_s", "backoff_s"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"timing.{name} must be >= 0 seconds, got {getattr(self, name)!r}")
        if not (math.isfinite(self.probe_threshold) and self.probe_threshold > 1):
            raise ValueError(f"timing.probe_threshold must be a slowdown factor > 1, got {self.probe_threshold!r}")
        if not 0 < self.wait_threshold <= 1:
            raise ValueError(f"timing.wait_threshold must be a fraction in (0, 1], got {self.wait_threshold!r}")
        if not self.timeout_s > 0:
            raise ValueError(f"timing.timeout_s must be > 0 seconds, got {self.timeout_s!r}")

    @classmethod
    def from_mapping(cls, values: Mapping) -> TimingConfig:
        """A config from a suite's or the command line's `timing:`; an unknown key fails on one line naming the keys."""
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise ValueError(f"unknown timing key(s) {', '.join(unknown)}; keys: {', '.join(names)}")
        return cls(**values)


def quantile(xs: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile (q in [0, 1])."""
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def within_fences(samples: Sequence[float], fence: float = IQR_FENCE) -> list[float]:
    """The samples inside Tukey's fences; fewer than 4 samples have no meaningful quartiles and are all kept."""
    if len(samples) < 4:
        return list(samples)
    q1, q3 = quantile(samples, 0.25), quantile(samples, 0.75)
    lo, hi = q1 - fence * (q3 - q1), q3 + fence * (q3 - q1)
    return [s for s in samples if lo <= s <= hi]


@dataclass
class Timing:
    """Raw samples of one call, and the statistics the row reports (over the samples kept by `outliers`)."""

    samples_ms: list[float] = field(default_factory=list)
    threads: int = 0
    outliers: str = "none"
    cudagraph: bool = False

    @property
    def kept_ms(self) -> list[float]:
        return within_fences(self.samples_ms) if self.outliers == "iqr" else list(self.samples_ms)

    @property
    def outliers_removed(self) -> int:
        return len(self.samples_ms) - len(self.kept_ms)

    @property
    def median(self) -> float:
        return statistics.median(self.kept_ms)

    def quantile(self, q: float) -> float:
        """Linear-interpolated quantile of the kept samples (q in [0, 1])."""
        return quantile(self.kept_ms, q)

    @property
    def cv(self) -> float | None:
        """Coefficient of variation (stdev / mean) of the kept samples; None for fewer than two."""
        kept = self.kept_ms
        if len(kept) < 2 or statistics.fmean(kept) <= 0:
            return None
        return statistics.stdev(kept) / statistics.fmean(kept)


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


def cuda_graphed(fn: Callable[[], object], device: torch.device) -> Callable[[], object]:
    """`fn` captured into a CUDA graph; the returned callable replays it.

    Warm-up runs on a side stream first, as torch.cuda.graphs asks (lazy init, autotune and allocator
    pools must not happen during capture). The graph keeps the closure's tensors: they are static inputs.
    """
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize(device)
    return graph.replay


def _warm_up(fn: Callable[[], object], device: torch.device, cfg: TimingConfig) -> float:
    """Run the warm-up calls; seconds of the last one (0 when there is none), the first estimate of a call."""
    last = 0.0
    for _ in range(cfg.warmup):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        last = time.perf_counter() - t0
        if last > cfg.timeout_s:
            raise CellTimeout(f"one call took {last:.1f} s > timeout_s={cfg.timeout_s}")
    return last


def _block_size(timing: Timing, estimate_s: float, quantum_s: float, cfg: TimingConfig) -> int:
    """Calls in this round's block: about `quantum_s` of work, at least one, never past max_repeats."""
    per_call = statistics.median(timing.samples_ms) / 1e3 if timing.samples_ms else estimate_s
    want = max(1, math.ceil(quantum_s / per_call)) if per_call > 0 else 1
    return min(want, cfg.max_repeats - len(timing.samples_ms))


def _finished(timing: Timing, spent_s: float, cfg: TimingConfig) -> bool:
    n = len(timing.samples_ms)
    return n >= cfg.max_repeats or (n >= cfg.min_repeats and spent_s >= cfg.min_time_s)


def measure_latencies(
    fns: Sequence[Callable[[], object]],
    device: torch.device,
    cfg: TimingConfig | None = None,
    between_rounds: Callable[[], object] | None = None,
) -> list[Timing | Exception]:
    """Time each of `fns` in alternating rounds until each has `min_time_s` of samples and `min_repeats`.

    Each round gives every unfinished call a block of about `min_time_s / rounds` seconds (at least
    one call), so all of them are sampled across the same stretch of time, whatever their speeds.
    `between_rounds` runs after each round but the last (the interference probe reads the machine
    there). A call that raises (a timeout, an OOM) gets its exception in its slot and leaves the
    rotation; the others go on.
    """
    cfg = cfg or TimingConfig()
    device = torch.device(device)
    cuda = device.type == "cuda"
    clock = _CudaClock(device) if cuda else _CpuClock()
    graphed = cfg.cudagraph and cuda
    calls = list(fns)
    results: list[Timing | Exception] = []
    estimates = []
    for i, fn in enumerate(calls):
        try:
            estimates.append(_warm_up(fn, device, cfg))
            if graphed:
                calls[i] = cuda_graphed(fn, device)
            results.append(Timing(threads=torch.get_num_threads(), outliers=cfg.outliers, cudagraph=graphed))
        except Exception as err:  # noqa: BLE001 - this call's failure, not the others'
            estimates.append(0.0)
            results.append(err)
    spent = [0.0] * len(calls)
    quantum = cfg.min_time_s / cfg.rounds
    active = [i for i, r in enumerate(results) if isinstance(r, Timing)]
    while active:
        for position, i in enumerate(active):
            if position and cfg.pause_s:
                time.sleep(cfg.pause_s)
            timing = results[i]
            assert isinstance(timing, Timing)
            try:
                for _ in range(_block_size(timing, estimates[i], quantum, cfg)):
                    clock.before()
                    calls[i]()
                    sample = clock.after()
                    if sample > cfg.timeout_s * 1e3:
                        raise CellTimeout(f"one call took {sample / 1e3:.1f} s > timeout_s={cfg.timeout_s}")
                    timing.samples_ms.append(sample)
                    spent[i] += sample / 1e3
            except Exception as err:  # noqa: BLE001
                results[i] = err
        active = [i for i in active if isinstance(results[i], Timing) and not _finished(results[i], spent[i], cfg)]
        if active and between_rounds is not None:
            between_rounds()
    return results


def measure_latency(fn: Callable[[], object], device: torch.device, cfg: TimingConfig | None = None) -> Timing:
    """Time one call (the loop of `measure_latencies` with a single implementation); its exception is raised."""
    (result,) = measure_latencies([fn], device, cfg)
    if isinstance(result, Exception):
        raise result
    return result
