"""The measurement every task shares: latency and memory of one call, and the result checks.

Every task that times a call ends here, so its latency and memory columns
mean the same thing.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from bench.measure.allocator import cpu_thp_alloc
from bench.measure.interference import (
    GpuState,
    Measured,
    RetryPolicy,
    gpu_state,
    idle_probe_seconds,
    measure_until_quiet,
    probe_seconds,
    runqueue_meter,
    throttled,
)
from bench.measure.memory import measure_peak_memory
from bench.measure.timing import Timing, TimingConfig, measure_latencies

# Relative Frobenius error above which an exact method's output is `wrong`, per input dtype.
EXACT_REL_TOLERANCE = {"float32": 1e-3, "float16": 1e-2, "bfloat16": 5e-2, "float64": 1e-8}


class WrongResult(Exception):
    """The call returned NaN/Inf or disagrees with the oracle beyond tolerance (a row with status `wrong`)."""


def check_finite(out: torch.Tensor, what: str = "output") -> None:
    if not torch.isfinite(out).all():
        bad = int((~torch.isfinite(out)).sum())
        raise WrongResult(f"{what} has {bad} NaN/Inf values")


def check_exact(fidelity_rel: float, dtype: str) -> None:
    tol = EXACT_REL_TOLERANCE[dtype]
    if not math.isfinite(fidelity_rel) or fidelity_rel > tol:
        raise WrongResult(f"relative error {fidelity_rel:.3g} against the fp64 oracle exceeds {tol:g} for {dtype}")


@dataclass
class TimedCall:
    """One implementation's call to time, with what its throughput is measured against."""

    fn: Callable[[], object]
    flops: int | None = None
    peak_tflops: float | None = None


# Whether each of the last RECENT measurements ended noisy. Sustained load does not leave by waiting: while
# NOISY_STREAK or more of them did, a measurement is made once (and flagged if disturbed), so a busy machine
# costs each cell one measurement, not 1 + max_retries plus 1.5 s of back-off. Measured on this 2-core VM
# with the host busy (383 of 614 rows noisy): retried cells took 457 s of the `cpu` suite's 798 s when only
# an unbroken streak of three stopped the retries, since one quiet reading in between re-armed them.
RECENT = 6
NOISY_STREAK = 3
_recent_noisy: collections.deque[bool] = collections.deque(maxlen=RECENT)


def _probed(device: torch.device, timing: TimingConfig) -> tuple[Callable[[], float], float, RetryPolicy] | None:
    """The probe, its idle figure and the retry policy, or None when the config turns the probe off."""
    if not timing.probe:
        return None
    retries = 0 if sum(_recent_noisy) >= NOISY_STREAK else timing.max_retries
    policy = RetryPolicy(threshold=timing.probe_threshold, max_retries=retries, backoff_s=timing.backoff_s,
                         wait_threshold=timing.wait_threshold)  # fmt: skip
    return (lambda: probe_seconds(device)), idle_probe_seconds(device), policy


def _interference_columns(measured: Measured | None, before: GpuState | None, after: GpuState | None) -> dict:
    """What the probe and NVML said about a measurement: the row's evidence for trusting its latency."""
    row: dict = {"noisy": None, "probe_slowdown": None, "runqueue_wait": None, "measure_attempts": 1,
                 "probe_readings": None}  # fmt: skip
    if measured is not None:
        row.update(noisy=bool(measured.noisy), probe_slowdown=float(measured.slowdown), runqueue_wait=measured.wait,
                   measure_attempts=int(measured.attempts), probe_readings=len(measured.probes))  # fmt: skip
    if before is not None or after is not None:
        states = [s for s in (before, after) if s is not None]
        row.update(
            throttled=throttled(before, after),
            throttle_reasons=",".join(sorted({n for s in states for n in s.reason_names})),
            sm_clock_mhz=min(s.sm_clock_mhz for s in states),
            max_sm_clock_mhz=max(s.max_sm_clock_mhz for s in states),
            gpu_temperature_c=max(s.temperature_c for s in states),
        )
    return row


def latency_columns(t: Timing, flops: int | None, peak_tflops: float | None) -> dict:
    """Latency columns (median, p10, p90, CV, raw samples) and throughput against the profile's peak."""
    median = t.median
    row = {
        "latency_ms": median,
        "latency_ms_p10": t.quantile(0.1),
        "latency_ms_p90": t.quantile(0.9),
        "latency_cv": t.cv,
        "latency_samples_ms": list(t.samples_ms),
        "outliers_removed": t.outliers_removed,
        "cudagraph": t.cudagraph,
        "repeats": len(t.samples_ms),
        "threads": t.threads,
    }
    if flops is not None:
        row["flops"] = int(flops)
        row["tflops"] = flops / (median * 1e-3) / 1e12 if median > 0 else None
        row["pct_peak"] = 100.0 * row["tflops"] / peak_tflops if peak_tflops and row["tflops"] is not None else None
    return row


def measure_calls(
    calls: Sequence[TimedCall], device: torch.device, timing: TimingConfig, measure_memory: bool = True
) -> list[dict | Exception]:
    """The timed columns of each call (or the exception that ended it), its peers timed in alternating rounds.

    The interference probe reads the machine before, between the rounds of and after the timing, and on CPU
    the run queue says how long the timed threads waited for a core; while either says disturbed, every call still standing is timed again (bench.measure.interference). Peak memory is
    measured afterwards, one call at a time: load changes how long a call takes, not what it allocates.
    """
    device = torch.device(device)
    outcome: list[Timing | Exception | None] = [None] * len(calls)

    def attempt(read_probe: Callable[[], object] | None = None) -> None:
        todo = [i for i, o in enumerate(outcome) if not isinstance(o, Exception)]
        got = measure_latencies([calls[i].fn for i in todo], device, timing, between_rounds=read_probe)
        for i, result in zip(todo, got, strict=True):
            outcome[i] = result

    before = gpu_state(device)
    probed = _probed(device, timing)
    measured = None
    if probed is None:
        attempt()
    else:
        probe, idle, policy = probed
        # The run queue is read on CPU only: a GPU cell's time is the device's, which host load does not take.
        meter = runqueue_meter if device.type == "cpu" else None
        measured = measure_until_quiet(attempt, probe, idle, policy, probe_between=True, meter=meter)
        _recent_noisy.append(bool(measured.noisy))
    evidence = _interference_columns(measured, before, gpu_state(device))
    if device.type == "cpu":
        evidence["cpu_thp_alloc"] = cpu_thp_alloc()
    rows: list[dict | Exception] = []
    for call, result in zip(calls, outcome, strict=True):
        if isinstance(result, Exception):
            rows.append(result)
            continue
        assert isinstance(result, Timing)
        row = {**latency_columns(result, call.flops, call.peak_tflops), **evidence, "interleaved": len(calls)}
        if measure_memory:
            try:
                row["peak_mem_bytes"] = measure_peak_memory(call.fn, device)
            except Exception as err:  # noqa: BLE001 - this call's failure
                rows.append(err)
                continue
        rows.append(row)
    return rows


def measure_call(
    fn: Callable[[], object],
    device: torch.device,
    timing: TimingConfig,
    flops: int | None = None,
    peak_tflops: float | None = None,
    measure_memory: bool = True,
) -> dict:
    """The timed columns of one call (`measure_calls` with no peers); the exception that ended it is raised."""
    (row,) = measure_calls([TimedCall(fn, flops, peak_tflops)], device, timing, measure_memory)
    if isinstance(row, Exception):
        raise row
    return row
