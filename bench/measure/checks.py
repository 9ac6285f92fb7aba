"""The measurement every task shares: latency and memory of one call, and the result checks.

Every task that times a call ends here, so its latency and memory columns
mean the same thing.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from bench.measure.memory import measure_peak_memory
from bench.measure.timing import TimingConfig, measure_latency

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


def measure_call(
    fn: Callable[[], object],
    device: torch.device,
    timing: TimingConfig,
    flops: int | None = None,
    peak_tflops: float | None = None,
    measure_memory: bool = True,
) -> dict:
    """Latency columns (median, p10, p90, raw samples), throughput against the profile's peak, peak memory."""
    t = measure_latency(fn, device, timing)
    median = t.median
    row = {
        "latency_ms": median,
        "latency_ms_p10": t.quantile(0.1),
        "latency_ms_p90": t.quantile(0.9),
        "latency_samples_ms": list(t.samples_ms),
        "repeats": len(t.samples_ms),
        "threads": t.threads,
    }
    if flops is not None:
        row["flops"] = int(flops)
        row["tflops"] = flops / (median * 1e-3) / 1e12 if median > 0 else None
        row["pct_peak"] = 100.0 * row["tflops"] / peak_tflops if peak_tflops and row["tflops"] is not None else None
    if measure_memory:
        row["peak_mem_bytes"] = measure_peak_memory(fn, device)
    return row
