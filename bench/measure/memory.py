"""Peak memory of one call, measured in a loop of its own (never while timing).

CUDA: the caching allocator's peak over the baseline allocated before the
call. CPU: torch's profiler records every allocation with the running total,
so the peak is the largest total minus the total before the first
allocation. RSS-based numbers miss allocations that reuse freed pages, and
tracemalloc does not see torch's allocator at all.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Callable

import torch


def _cuda_peak(fn: Callable[[], object], device: torch.device) -> int:
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    baseline = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - baseline
    del result
    return int(peak)


@contextlib.contextmanager
def _quiet_stderr():
    """Kineto prints start/stop lines on the C-level stderr; keep them out of the bench output."""
    try:
        fd = os.dup(2)
    except OSError:
        yield
        return
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            with contextlib.redirect_stderr(io.StringIO()):
                yield
        finally:
            os.dup2(fd, 2)
            os.close(fd)


def _cpu_peak(fn: Callable[[], object]) -> int:
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
        del result
    allocations = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        if event.tag == _EventType.Allocation:
            fields = event.extra_fields
            allocations.append((event.start_time_ns, fields.total_allocated, fields.alloc_size))
        stack.extend(event.children)
    if not allocations:
        return 0
    allocations.sort(key=lambda a: a[0])
    _, first_total, first_size = allocations[0]
    baseline = first_total - first_size  # bytes live before the call's first allocation
    return int(max(total for _, total, _ in allocations) - baseline)


def measure_peak_memory(fn: Callable[[], object], device: torch.device) -> int:
    """Bytes allocated at the call's peak beyond what was allocated before it (inputs excluded)."""
    device = torch.device(device)
    if device.type == "cuda":
        return _cuda_peak(fn, device)
    return _cpu_peak(fn)
