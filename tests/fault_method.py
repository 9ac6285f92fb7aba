"""A method that fails on purpose, for the fault-injection tests: `fault=<kind>` picks how.

Not part of the package (no conf/method YAML, never in a suite): tests import it (the `fault_method`
fixture registers it for one test and removes it after), and isolated runs name it in
`RunSettings.plugins`, so a worker process imports it too. `fault=none` is exact softmax.
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import time

import torch

from methods.base import Attention, Capabilities
from methods.registry import Param, method, register

FAULTS = ("none", "raise", "nan", "wrong", "oom", "alloc", "hang", "segfault", "abort", "kill", "exit")
FULL_DISK_ENV = "ATTNBENCH_TEST_FULL_DISK"  # set for a worker: its results folder reports a full disk


def _full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


if os.environ.get(FULL_DISK_ENV) == "1":
    import bench.results

    bench.results.write_row = _full_disk  # what write_rows calls

method("fault", family="exact", exact=True, description="fails on purpose (tests only)", source="tests",
       params=(Param("fault", str, "none", "how to fail", choices=FAULTS),))  # fmt: skip


@register("fault", "reference", "reference", Capabilities(decode=False), description="softmax, or a fault")
class FaultReference(Attention):
    def __init__(self, fault: str) -> None:
        super().__init__()
        self.fault = fault

    def forward(self, q, k, v, causal=False):
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
        match self.fault:
            case "raise":
                raise RuntimeError("injected failure")
            case "nan":
                return out * float("nan")
            case "wrong":
                return out + 1.0
            case "oom":
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB (injected)")
            case "alloc":  # a real allocation the allocator refuses
                return torch.empty(2**62, dtype=torch.uint8)
            case "hang":
                time.sleep(3600)
            case "segfault":
                ctypes.string_at(0)
            case "abort":
                os.abort()
            case "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            case "exit":
                os._exit(7)
        return out
