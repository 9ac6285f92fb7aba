"""Interference probe: notice when the machine is too busy for a cell's timing to be trusted.

Why this exists (issue 14): on a shared 2-core machine rows came out up to 100x slower than on
the idle machine, their medians looked plausible, and nothing said they were disturbed. Timing
alone cannot tell "this method is slow" from "something else had the cores"; a fixed workload
whose idle speed is known can. So:

- `probe_seconds` times a small fixed workload (a GEMM and a memory copy sized for the device);
- `idle_probe_seconds` measures its idle figure once per CPU (and GPU) identity and caches it
  beside the hardware profile's measurement, so a later busy run compares against a quiet one;
- `runqueue_meter` reads, on Linux, how long this process's threads waited for a core while they
  were runnable during a measurement (the kernel's per-thread `schedstat`): the direct evidence of
  "something else had the cores", which a short probe can miss (CPU only);
- `assess` turns probe readings and that wait into a verdict (pure, so the decision is tested with
  injected readings, never with timing assertions);
- `measure_until_quiet` probes before and after a measurement, re-measures with a growing
  back-off while the probe says the machine is disturbed, and flags the result `noisy` when it
  stays disturbed (the samples are kept: a noisy row is reported, not dropped);
- `gpu_state` / `throttled` read the SM clock, temperature and throttle reasons through NVML
  when `nvidia-ml-py` is installed, so a GPU row can say its clocks were capped.

`bench.measure.checks.measure_calls` wires these around every timed measurement.
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch

from bench.measure.files import atomic_write
from bench.measure.hardware import _cache_path, _loadavg_1m, cpu_identity, default_cache_dir

log = logging.getLogger(__name__)

T = TypeVar("T")

# ----------------------------------------------------------------------------- probe workload

# CPU: one 256x256 fp32 matmul (33.5 MFLOP) and a 256 KiB copy per repeat: ~0.3 ms per repeat at 1
# thread on this 2-core machine, so a probe call (1 warm-up + 4 timed repeats) costs ~1.5 ms. The copy
# stays inside L2 on purpose: an 8 MiB copy (the first design) read 1.4-1.7x slower right after any
# cell that had touched more memory than the L3 (a softmax reference at N=2048, even a 1024^2 GEMM)
# and kept reading so for several ms of warm-up, so quiet needle cells were flagged noisy (29% of
# them in one smoke run at load 0.6). With the small copy the same reading is 1.04-1.08x. What the
# probe sees is therefore time on the cores (another process's threads), not DRAM bandwidth taken
# by a neighbour; that kind of contention moved this machine's 1-thread cells by under 1.3x.
CPU_GEMM_N = 256
CPU_COPY_BYTES = 2**18  # 256 KiB
# CUDA: four fp16 4096^3 GEMMs (0.55 TFLOP) and a 128 MiB copy (larger than any L2 we profile, so
# it reaches HBM), meant to take ~1 ms on an H100-class GPU (not measured here: no GPU).
CUDA_GEMM_N = 4096
CUDA_GEMM_REPS = 4
CUDA_COPY_BYTES = 128 * 2**20
PROBE_REPEATS = 4
# Cap on the timed block (CPU): 4 undisturbed repeats take ~2.4 ms at 1 thread, so the cap only
# cuts a block that is already disturbed, and bounds what a probe costs on a busy machine.
PROBE_BUDGET_S = 3e-3
IDLE_READINGS = 20
PROBE_CACHE_FORMAT = 2  # bump when the probe workload changes: old idle figures are re-measured


class _Probe:
    """Preallocated probe buffers for one device, so a probe call allocates nothing.

    Allocating 16 MiB per call would add page faults (CPU) to every reading and would show up in
    neither the idle figure nor the cell. Held buffers do not distort memory rows: the CUDA memory
    loop and the CPU allocation trace both measure over the baseline allocated before the call.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        cuda = device.type == "cuda"
        n = CUDA_GEMM_N if cuda else CPU_GEMM_N
        dtype = torch.float16 if cuda else torch.float32
        # A private generator: creating the probe mid-run must not shift the seeded global RNG
        # stream the cells draw their inputs from.
        gen = torch.Generator().manual_seed(0)
        self.a = torch.rand(n, n, generator=gen).to(device=device, dtype=dtype)
        self.b = torch.rand(n, n, generator=gen).to(device=device, dtype=dtype)
        self.out = torch.empty(n, n, device=device, dtype=dtype)
        numel = (CUDA_COPY_BYTES if cuda else CPU_COPY_BYTES) // 4
        self.src = torch.ones(numel, device=device, dtype=torch.float32)
        self.dst = torch.empty_like(self.src)
        self.gemm_reps = CUDA_GEMM_REPS if cuda else 1

    def run(self) -> None:
        for _ in range(self.gemm_reps):
            torch.matmul(self.a, self.b, out=self.out)
        self.dst.copy_(self.src)


_PROBES: dict[str, _Probe] = {}


def _normalise(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _probe_for(device: torch.device) -> _Probe:
    key = str(device)
    if key not in _PROBES:
        _PROBES[key] = _Probe(device)
    return _PROBES[key]


def probe_seconds(
    device: torch.device | str = "cpu", repeats: int = PROBE_REPEATS, budget_s: float = PROBE_BUDGET_S
) -> float:
    """Seconds per repeat of the probe workload: one untimed warm-up, then up to `repeats` timed as one block.

    The block is timed as a whole (mean per repeat), not as the best of its repeats. On this
    machine the best of 4-5 sub-millisecond repeats is blind to contention: with two busy
    processes on the two cores the best repeat at 1 thread was 0.61-0.86 ms against 0.55-0.76 ms
    without them (a scheduler slice is longer than one repeat, so some repeat always runs
    uninterrupted), while the block's total went from ~3.5 ms to 7.8-16.8 ms. A single blip can
    inflate one reading; `measure_until_quiet` answers that with one re-measurement.

    The warm-up puts the probe's buffers back in cache after a cell evicted them, so a reading
    compares with the (warm) idle figure. The probe runs at torch's current thread count, the one
    the cells run at: with 2 threads and one core taken, every OpenMP barrier waits for a
    descheduled thread, which a 1-thread probe would not see and a 2-thread cell suffers.

    Cost: the timed block stops once it has run `budget_s` (CPU only), so a badly disturbed call
    costs one warm-up plus about `budget_s` plus one stalled repeat instead of `repeats` stalls.
    Measured on this 2-core CPU while other work loaded it (1-min load 2.1-2.6), 100-200 calls:
    at 1 thread 3.2-3.4 ms per call (median 3.2, max 4.8; reading 0.57-0.62 ms per repeat), within
    the 5 ms budget. At 2 threads an undisturbed repeat takes 0.29 ms (~1.5 ms per call), but on
    that loaded machine every OpenMP region stalled ~20 ms, so readings were 20-24 ms (a 70x
    slowdown, correctly disturbed) and a call cost 44-53 ms: the warm-up and one capped repeat.
    That cost is the load's, and is paid only where the cell's own timing is already ruined.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    device = _normalise(device)
    probe = _probe_for(device)
    with torch.inference_mode():
        if device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            probe.run()
            start.record()
            for _ in range(repeats):
                probe.run()
            end.record()
            torch.cuda.synchronize(device)
            return start.elapsed_time(end) / 1e3 / repeats
        probe.run()
        t0 = time.perf_counter()
        done = 0
        while True:
            probe.run()
            done += 1
            elapsed = time.perf_counter() - t0
            if done >= repeats or elapsed >= budget_s:
                return elapsed / done


# ----------------------------------------------------------------------------- idle figure


def measure_idle_probe(device: torch.device | str = "cpu", readings: int = IDLE_READINGS) -> float:
    """Best of `readings` probe readings: the probe's speed when nothing interferes.

    The minimum (not the median) because the idle figure estimates capability, as the hardware
    profile's peaks do: slower readings are interference. 20 readings cost ~50 ms on this CPU.
    """
    if readings < 1:
        raise ValueError(f"readings must be >= 1, got {readings}")
    return min(probe_seconds(device) for _ in range(readings))


def _probe_identity(device: torch.device) -> dict[str, Any]:
    """The CPU identity (model, threads, torch) plus the device and probe layout.

    Reuses `cpu_identity` so the idle figure is invalidated exactly when the hardware profile's
    measurement is; the GPU name is added because the same host may carry different GPUs.
    """
    identity = {**cpu_identity(), "probe_device": device.type, "probe_format": PROBE_CACHE_FORMAT}
    if device.type == "cuda":
        try:
            identity["gpu_name"] = torch.cuda.get_device_name(device)
        except Exception:  # informational; an unnamed GPU still gets its own figure per type
            identity["gpu_name"] = "cuda"
    return identity


def idle_cache_path(device: torch.device | str = "cpu", cache_dir: Path | None = None) -> Path:
    """Where the idle figure for this identity lives: beside `cpu_profile_<digest>.json`, same digest scheme."""
    device = _normalise(device)
    identity = _probe_identity(device)
    base = _cache_path(Path(cache_dir) if cache_dir is not None else default_cache_dir(), identity)
    return base.with_name(base.name.replace("cpu_profile_", "probe_idle_", 1))


def _read_idle(path: Path, identity: dict[str, Any]) -> float | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        idle = data["idle_s"]
        if data.get("identity") != identity or isinstance(idle, bool) or not isinstance(idle, (int, float)):
            return None
        return float(idle) if math.isfinite(idle) and idle > 0 else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def idle_probe_seconds(device: torch.device | str = "cpu", cache_dir: Path | None = None) -> float:
    """The probe's idle figure for this machine: measured once, then read from the cache.

    Cached as JSON (written atomically) in the hardware profile's cache dir ($ATTNBENCH_CACHE_DIR
    or ~/.cache/attnbench), keyed like `cached_cpu_measurement`, so a busy run later compares
    against a figure taken when the machine was quiet. A missing, corrupt or stale file is
    re-measured. Measuring on a loaded machine logs a warning: the figure would be too slow and
    every later run would look quieter than it is; delete the file to re-measure.
    """
    device = _normalise(device)
    identity = _probe_identity(device)
    path = idle_cache_path(device, cache_dir)
    cached = _read_idle(path, identity)
    if cached is not None:
        return cached
    load = _loadavg_1m()
    idle = measure_idle_probe(device)
    if load is not None and load >= max(0.5, 0.25 * (os.cpu_count() or 1)):
        log.warning("idle probe measured at 1-min load %.2f; it may be too slow. Delete %s to re-measure.", load, path)
    payload = {
        "format": PROBE_CACHE_FORMAT,
        "identity": identity,
        "idle_s": idle,
        "loadavg_1m": load,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    try:
        atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(payload, indent=2, sort_keys=True)))
    except OSError as exc:  # read-only home etc.: the run still gets its figure
        log.warning("could not write idle probe cache %s: %s", path, exc)
    return idle


# ----------------------------------------------------------------------------- run-queue wait

# Why a second signal (measured on this 2-core machine, 2 threads, softmax at N=1024, B=1 H=8 D=64):
# with one busy neighbour process the probe read 1.08-1.14x idle, under the 1.3x threshold, while the
# same-run ratio reference/sdpa moved from 5.06 to 3.96-4.88 (the two implementations suffer the lost
# core differently, so interleaving cannot cancel it). A probe of ~1.5 ms runs inside the scheduler's
# wake-up credit and sees little; the cell's own threads see all of it. Their run-queue wait (the
# second field of /proc/self/task/<tid>/schedstat) over their runnable time was 0.1-0.9% idle,
# 35-44% with one busy neighbour and 59-61% with three, for sdpa and the reference alike.
TASKS_DIR = "/proc/self/task"


def _thread_schedstats() -> dict[str, tuple[int, int]] | None:
    """(ns on a core, ns runnable but waiting) per thread of this process; None where the kernel has no schedstat."""
    try:
        tids = os.listdir(TASKS_DIR)
    except OSError:
        return None
    stats: dict[str, tuple[int, int]] = {}
    for tid in tids:
        try:
            with open(f"{TASKS_DIR}/{tid}/schedstat", encoding="ascii") as f:
                on_cpu, waiting = f.read().split()[:2]
            stats[tid] = (int(on_cpu), int(waiting))
        except (OSError, ValueError):  # a thread that exited meanwhile, or an unexpected format
            continue
    return stats or None


# A running thread's time on a core is brought up to date at scheduler ticks and switches only (seen here:
# deltas in whole 4 ms ticks, and none at all over a 0.3 ms measurement under load), so a window with less
# runnable time than a few ticks says nothing either way: its reading is None and the probe alone judges.
MIN_RUNNABLE_NS = 10_000_000


def runqueue_wait(
    before: dict[str, tuple[int, int]] | None,
    after: dict[str, tuple[int, int]] | None,
    min_runnable_ns: int = MIN_RUNNABLE_NS,
) -> float | None:
    """The fraction of this process's runnable thread time spent waiting for a core between two snapshots.

    Threads that appeared in between count from zero (a pool started by the cell); threads that
    exited are not seen (their last interval is lost, so the figure errs quiet). None without data
    or with less than `min_runnable_ns` of runnable time in between.
    """
    if before is None or after is None:
        return None
    on_cpu = waiting = 0
    for tid, (run_ns, wait_ns) in after.items():
        run0, wait0 = before.get(tid, (0, 0))
        on_cpu += max(0, run_ns - run0)
        waiting += max(0, wait_ns - wait0)
    runnable = on_cpu + waiting
    return waiting / runnable if runnable > 0 and runnable >= min_runnable_ns else None


def runqueue_meter() -> Callable[[], float | None]:
    """Start measuring the run-queue wait; the returned function reads the fraction since the start.

    Cost: one read of each thread's schedstat (~0.1 ms for a handful of threads here). On a system
    without /proc (macOS, Windows) the reading is None and only the probe judges.
    """
    start = _thread_schedstats()
    return lambda: runqueue_wait(start, _thread_schedstats())


# ----------------------------------------------------------------------------- decision

DEFAULT_THRESHOLD = 1.3
# 10%: 10x the worst idle figure seen here (0.9%), a quarter of what one busy neighbour caused (35-44%).
DEFAULT_WAIT_THRESHOLD = 0.1


@dataclass(frozen=True)
class ProbeVerdict:
    """`slowdown`: the probe's slowdown over its idle figure; `wait`: the run-queue wait fraction (None: unknown);
    `disturbed`: slowdown > threshold or wait > wait threshold."""

    disturbed: bool
    slowdown: float
    wait: float | None = None


def _check_idle(idle: float) -> None:
    if not (isinstance(idle, (int, float)) and math.isfinite(idle) and idle > 0):
        raise ValueError(f"idle probe figure must be a positive finite number of seconds, got {idle!r}")


def _check_threshold(threshold: float) -> None:
    if not (isinstance(threshold, (int, float)) and math.isfinite(threshold) and threshold > 1):
        raise ValueError(f"threshold must be a finite slowdown factor > 1, got {threshold!r}")


def _check_wait_threshold(wait_threshold: float) -> None:
    if not (isinstance(wait_threshold, (int, float)) and 0 < wait_threshold <= 1):
        raise ValueError(f"wait threshold must be a fraction in (0, 1], got {wait_threshold!r}")


def assess(
    readings: Sequence[float],
    idle: float,
    threshold: float = DEFAULT_THRESHOLD,
    wait: float | None = None,
    wait_threshold: float = DEFAULT_WAIT_THRESHOLD,
) -> ProbeVerdict:
    """Verdict on probe readings (seconds) against the idle figure, and on the measurement's run-queue wait.

    Disturbed when the slowdown exceeds `threshold` or the wait fraction (None: not measured)
    exceeds `wait_threshold`: either is evidence that something else had the cores.

    Two readings (before and after a measurement): their maximum, since load that starts or stops
    during the measurement shows in only one of them and a median of two would halve it. Three or
    more (the timing loop reads the probe between its rounds too): their median, the statistic the
    row itself reports: load over less than half of the measurement moves neither the median
    latency nor the median reading, and one slow reading (a reading right after a cell that evicted
    the probe's buffers) does not flag a quiet cell. Load over most of it moves both.
    A slowdown below 1 is reported as is: it means the idle figure was taken on a busy machine.
    """
    _check_idle(idle)
    _check_threshold(threshold)
    _check_wait_threshold(wait_threshold)
    if wait is not None and not (isinstance(wait, (int, float)) and 0 <= wait <= 1):
        raise ValueError(f"run-queue wait must be a fraction in [0, 1], got {wait!r}")
    if len(readings) == 0:
        raise ValueError("assess needs at least one probe reading")
    bad = [r for r in readings if not (isinstance(r, (int, float)) and math.isfinite(r) and r > 0)]
    if bad:
        raise ValueError(f"probe readings must be positive finite seconds, got {bad[0]!r}")
    slowdown = (max(readings) if len(readings) < 3 else statistics.median(readings)) / idle
    waited = wait is not None and wait > wait_threshold
    return ProbeVerdict(disturbed=slowdown > threshold or waited, slowdown=slowdown, wait=wait)


@dataclass(frozen=True)
class RetryPolicy:
    """When to re-measure a disturbed cell, and how long to wait first.

    - `threshold` 1.3x: measured on this 2-core machine at 1 thread, the slowdown of a quiet run
      (max of the two readings over the best-of-20 idle figure) was 1.14-1.30x while other work
      already held the load average at ~2.5, and 1.4-21x (mostly 3-15x) with two busy processes
      added; the slowdowns issue 14 reports are 1.7x-96x. 1.3x sits just above the jitter of an
      already shared machine and below the smallest slowdown worth flagging. A truly idle
      machine jitters less, so there 1.3x leaves more margin.
    - `max_retries` 2: a transient burst (another job's compile, a cron task) rarely outlasts two
      back-offs; sustained load does not go away by waiting, so more retries only multiply the
      cost (each retry repeats the cell's >= 0.3 s of timing) before the row is flagged anyway.
    - `backoff_s` 0.5, growing x2 (0.5 s, then 1 s): long enough for a burst to pass, short
      against the cell; the worst case adds 1.5 s of sleep to a disturbed cell.
    - `wait_threshold` 0.1: the run-queue wait fraction above which a measurement is disturbed
      whatever the probe read (see `runqueue_meter`).
    """

    threshold: float = DEFAULT_THRESHOLD
    max_retries: int = 2
    backoff_s: float = 0.5
    backoff_growth: float = 2.0
    wait_threshold: float = DEFAULT_WAIT_THRESHOLD

    def __post_init__(self) -> None:
        _check_threshold(self.threshold)
        _check_wait_threshold(self.wait_threshold)
        if isinstance(self.max_retries, bool) or not isinstance(self.max_retries, int) or self.max_retries < 0:
            raise ValueError(f"max_retries must be an integer >= 0, got {self.max_retries!r}")
        if not (math.isfinite(self.backoff_s) and self.backoff_s >= 0):
            raise ValueError(f"backoff_s must be finite and >= 0, got {self.backoff_s!r}")
        if not (math.isfinite(self.backoff_growth) and self.backoff_growth >= 1):
            raise ValueError(f"backoff_growth must be finite and >= 1, got {self.backoff_growth!r}")

    def backoff(self, retry: int) -> float:
        """Seconds to wait before retry number `retry` (1-based): backoff_s * growth**(retry-1)."""
        return self.backoff_s * self.backoff_growth ** (retry - 1)


@dataclass
class Measured(Generic[T]):
    """The last measurement, and what the probe said about it.

    `noisy`: still disturbed after every retry (the value is kept, to be reported with the flag);
    `slowdown`: the probe slowdown of the returned attempt; `attempts`: measurements made
    (1 = first was quiet); `probes`: every reading in order, before and after each attempt;
    `slowdowns`: each attempt's slowdown, so a report can show how disturbed the discarded ones were;
    `wait`: the returned attempt's run-queue wait fraction (None: not measured).
    """

    value: T
    noisy: bool
    slowdown: float
    attempts: int
    probes: list[float] = field(default_factory=list)
    slowdowns: list[float] = field(default_factory=list)
    wait: float | None = None


def measure_until_quiet(
    measure: Callable[..., T],
    probe: Callable[[], float],
    idle: float,
    policy: RetryPolicy | None = None,
    sleep: Callable[[float], object] = time.sleep,
    probe_between: bool = False,
    meter: Callable[[], Callable[[], float | None]] | None = None,
) -> Measured[T]:
    """Run `measure` between two probe readings; re-measure while the probe (or the run queue) says disturbed.

    `meter` (e.g. `runqueue_meter`) is started before each attempt's measurement and read after it;
    its wait fraction joins the probe readings in `assess`.

    With `probe_between`, `measure` is called with a function that takes one more reading (the timing
    loop calls it between its rounds), so load that comes and goes within a long measurement is seen
    even when both ends read quiet. Up to `policy.max_retries` re-measurements, each after a growing
    back-off; the probe is read
    again after each back-off rather than reusing the previous "after" reading, because the
    point of waiting is that the load may have left. That "before" reading runs with the
    scheduler's wake-up credit from the sleep and can read quiet under load (seen here); the
    "after" one follows the measurement in steady state, and `assess` takes the max of them. Returns the last attempt (not the fastest:
    choosing the fastest of disturbed attempts would bias rows low on exactly the busy machines
    this guards against). Exceptions from `measure` or `probe` propagate: the runner turns them
    into a failed row as it does today.
    """
    policy = policy or RetryPolicy()
    _check_idle(idle)
    probes: list[float] = []
    slowdowns: list[float] = []
    attempt = 0
    while True:
        attempt += 1
        readings = [probe()]
        read_wait = meter() if meter is not None else None
        value = measure(lambda readings=readings: readings.append(probe())) if probe_between else measure()
        wait = read_wait() if read_wait is not None else None
        readings.append(probe())
        probes += readings
        verdict = assess(readings, idle, policy.threshold, wait, policy.wait_threshold)
        slowdowns.append(verdict.slowdown)
        if not verdict.disturbed or attempt > policy.max_retries:
            return Measured(
                value=value,
                noisy=verdict.disturbed,
                slowdown=verdict.slowdown,
                attempts=attempt,
                probes=probes,
                slowdowns=slowdowns,
                wait=wait,
            )
        sleep(policy.backoff(attempt))


# ----------------------------------------------------------------------------- GPU state

# NVML clock-event ("throttle") reason bits, from nvml.h (stable across driver versions).
NVML_REASONS: dict[int, str] = {
    0x1: "gpu_idle",
    0x2: "applications_clocks_setting",
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal_slowdown",
    0x40: "hw_thermal_slowdown",
    0x80: "hw_power_brake_slowdown",
    0x100: "display_clock_setting",
}
# Reasons that lower clocks below what the workload asked for. Idle, user-pinned application
# clocks, sync boost and display clocks are not interference with a measurement.
THROTTLE_MASK = 0x4 | 0x8 | 0x20 | 0x40 | 0x80


@dataclass(frozen=True)
class GpuState:
    """One NVML reading: SM clock now and at most (MHz), temperature (C), clock-event reason bits."""

    sm_clock_mhz: int
    max_sm_clock_mhz: int
    temperature_c: int
    reasons: int

    @property
    def reason_names(self) -> list[str]:
        return [name for bit, name in NVML_REASONS.items() if self.reasons & bit]

    @property
    def throttled(self) -> bool:
        return bool(self.reasons & THROTTLE_MASK)


_nvml_ready = False


def _nvml_handle(pynvml: Any, device: torch.device) -> Any:
    """NVML handle of the GPU torch calls `device`: by UUID, because NVML numbers GPUs physically
    and CUDA_VISIBLE_DEVICES renumbers them; by index only when nothing renumbers."""
    index = device.index if device.index is not None else 0
    try:
        uuid = str(torch.cuda.get_device_properties(index).uuid)
        return pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
    except Exception:
        if os.environ.get("CUDA_VISIBLE_DEVICES"):
            raise
        return pynvml.nvmlDeviceGetHandleByIndex(index)


def gpu_state(device: torch.device | str) -> GpuState | None:
    """SM clock, temperature and throttle reasons of a CUDA device through NVML, else None.

    None (never an error) on a non-CUDA device, without `nvidia-ml-py` installed, or when NVML
    fails (no driver, a container without NVML): GPU state is evidence for a flag, and missing
    evidence must not fail a benchmark run.
    """
    global _nvml_ready
    device = torch.device(device)
    if device.type != "cuda":
        return None
    try:
        import pynvml  # from the nvidia-ml-py package; optional
    except ImportError:
        return None
    try:
        if not _nvml_ready:
            pynvml.nvmlInit()
            _nvml_ready = True
        handle = _nvml_handle(pynvml, device)
        reasons_fn = (
            getattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons", None)
            or pynvml.nvmlDeviceGetCurrentClocksThrottleReasons
        )
        clock_sm = getattr(pynvml, "NVML_CLOCK_SM", 1)
        return GpuState(
            sm_clock_mhz=int(pynvml.nvmlDeviceGetClockInfo(handle, clock_sm)),
            max_sm_clock_mhz=int(pynvml.nvmlDeviceGetMaxClockInfo(handle, clock_sm)),
            temperature_c=int(pynvml.nvmlDeviceGetTemperature(handle, getattr(pynvml, "NVML_TEMPERATURE_GPU", 0))),
            reasons=int(reasons_fn(handle)),
        )
    except Exception as exc:  # NVMLError and friends: no evidence, no failure
        log.debug("gpu_state unavailable for %s: %s", device, exc)
        return None


def throttled(before: GpuState | None, after: GpuState | None) -> bool:
    """True when either reading shows a power, thermal or hardware slowdown reason.

    Reasons, not clock values: the "before" reading may find an idle GPU at low clocks, so a clock
    difference would flag healthy runs; the reason bits say why the clock is below the maximum.
    Missing readings (None) are not evidence of throttling.
    """
    return any(s is not None and s.throttled for s in (before, after))
