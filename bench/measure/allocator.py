"""CPU timing with fewer page faults: torch's huge-page allocation, and whether a run had it.

Why (issue 14): torch allocates a CPU tensor with `posix_memalign`, and glibc serves every large
block with a fresh `mmap` that `free` hands back to the kernel, so each call of an implementation
that materialises a large buffer faults all its pages in again. Measured on this 2-core VM (softmax
reference, B=1 H=8 D=64, fp32, 2 threads): at N=1024, 24,600 minor faults and 70 ms of system time
per 76 ms call; SDPA, which allocates almost nothing, none. The cost of a fault is the virtual
machine's (two VMs of the same type differed enough to move the smoke suite's reference/sdpa
ratios 1.5-4x), so such a row measured the host more than the method. A GPU row never pays it:
torch's CUDA caching allocator keeps freed blocks.

With `THP_MEM_ALLOC_ENABLE=1` (a torch switch; `bench/__init__.py` sets it before torch is
imported, unless the environment already says otherwise) blocks of 2 MiB and more are aligned to
and advised as transparent huge pages, one fault per 2 MiB instead of per 4 KiB: on the same VM
the reference took 42.6 ms per call at N=1024 (2,100 faults) and 135 ms at N=2048 (296 ms
before); SDPA 17.8 and 77 ms as before; resident memory unchanged. Keeping freed memory in glibc's
heap instead (`mallopt(M_MMAP_MAX, 0)`) removed the faults too but grew the heap by a block per
call for `posix_memalign`'s allocations, which a long sweep cannot afford.

It needs the kernel's THP mode to be `always` or `madvise` (`never` leaves 4 KiB pages); rows say
`cpu_thp_alloc` so a reader knows which kind of run a CPU latency came from.
"""

from __future__ import annotations

import os
from pathlib import Path

THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def thp_mode() -> str | None:
    """The kernel's transparent-huge-page mode (`always`, `madvise`, `never`), None where there is none."""
    try:
        text = THP_MODE.read_text(encoding="ascii")
    except OSError:
        return None
    chosen = [word.strip("[]") for word in text.split() if word.startswith("[")]
    return chosen[0] if chosen else None


def cpu_thp_alloc() -> bool:
    """Whether torch's CPU tensors of 2 MiB and more get huge pages in this process.

    True when `THP_MEM_ALLOC_ENABLE` was on for torch (read at its first allocation, so it counts
    only when set before torch was imported: `bench/__init__.py` does that for `python -m bench.*`)
    and the kernel's mode lets an advised region have huge pages.
    """
    import bench

    on = os.environ.get("THP_MEM_ALLOC_ENABLE") == "1" and bench.THP_SWITCH_IN_TIME
    return on and thp_mode() in ("always", "madvise")
