"""Which cells run together, where, and beside what: point groups, shards, isolation and workers.

The unit of scheduling is a *point group*: the implementations of one sweep point, timed together in
alternating rounds (bench.measure.checks.measure_calls) so that their same-run ratios hold. A group is
never split: not across shards, not across workers.

- **Shards** (`shard=i/n`, one Slurm array task each) take contiguous runs of groups, so a shard keeps
  what consecutive cells share (a needle haystack, an lm_swap base model) and its peers share a device.
- **Isolation** (`isolate=true`): a group runs in a worker process with a wall-clock limit, so a
  segfault, an OOM kill or a hang costs that group's rows, not the sweep. `auto` isolates on GPU and for
  tasks that train (hours of work beside a crash-prone kernel); CPU timing cells stay in-process
  (a worker's start-up would cost more than the smoke suite's cells).
- **Workers** (`workers=N`): on GPU one per device, pinned with CUDA_VISIBLE_DEVICES, so timed cells
  never share a device. On CPU every core is one device: a timed cell beside a busy worker measures the
  neighbour, not the method, so only cells of tasks that train run side by side; timing cells run
  alone, with no worker busy.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tasks import Cell, get_task

ISOLATE_CHOICES = ("auto", "true", "false")


def point_groups(cells: Sequence[Cell]) -> list[list[Cell]]:
    """Consecutive cells of one task, point and seed whose task interleaves them; every other cell alone."""
    groups: list[list[Cell]] = []
    key = None
    for cell in cells:
        together = get_task(cell.task).interleaves(cell)
        this = (cell.task, json.dumps(dict(cell.point), sort_keys=True, default=str), cell.seed) if together else None
        if this is not None and this == key:
            groups[-1].append(cell)
        else:
            groups.append([cell])
        key = this
    return groups


@dataclass(frozen=True)
class Shard:
    """The `index`-th of `count` shards of a sweep (0-based)."""

    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(value: object, count: object = None) -> Shard | None:
    """`shard=i/n`, or `shard=i shards=n` (what `-m shard='range(n)' shards=n` gives); None: no sharding."""
    if value is None or value == "":
        return None
    text = str(value).strip()
    m = re.fullmatch(r"(\d+)\s*/\s*(\d+)", text)
    if m:
        index, total = int(m.group(1)), int(m.group(2))
    elif text.isdigit() and count is not None and str(count).strip().isdigit():
        index, total = int(text), int(str(count).strip())
    else:
        raise ValueError(f"shard {value!r}: expected i/n (e.g. shard=0/4) or shard=i with shards=n")
    if total < 1 or not 0 <= index < total:
        raise ValueError(f"shard {value!r}: the index must be in 0..n-1 and n >= 1")
    return Shard(index, total)


def shard_cells(cells: Sequence[Cell], shard: Shard | None) -> list[Cell]:
    """The cells of one shard: contiguous runs of whole point groups, the shards as equal in groups as can be."""
    if shard is None:
        return list(cells)
    groups = point_groups(cells)
    lo, hi = shard.index * len(groups) // shard.count, (shard.index + 1) * len(groups) // shard.count
    return [cell for group in groups[lo:hi] for cell in group]


def parse_isolate(value: object) -> str:
    """`isolate` as one of auto / true / false (YAML booleans and strings alike)."""
    text = str(value).strip().lower()
    if text not in ISOLATE_CHOICES:
        raise ValueError(f"isolate {value!r}: choose from: {', '.join(ISOLATE_CHOICES)}")
    return text


def isolated(group: Sequence[Cell], isolate: str, device: torch.device) -> bool:
    """Whether this group runs in a worker process (see the module docstring for why `auto` is what it is)."""
    if isolate != "auto":
        return isolate == "true"
    return device.type == "cuda" or any(get_task(c.task).trains for c in group)


def parallel(group: Sequence[Cell], device: torch.device) -> bool:
    """Whether this group may run while other workers are busy: on GPU always (one device each), on CPU only
    for tasks that train."""
    return device.type == "cuda" or all(get_task(c.task).trains for c in group)


def visible_gpus(device: torch.device) -> list[str]:
    """The GPU ids workers pin with CUDA_VISIBLE_DEVICES: the visible list (as the parent sees it), or the one
    GPU `device=cuda:N` names."""
    if device.type != "cuda":
        return []
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [i.strip() for i in listed.split(",") if i.strip()] if listed else [str(i) for i in range(torch.cuda.device_count())]
    return [ids[device.index]] if device.index is not None else ids


def resolve_workers(value: object, device: torch.device, isolate: str) -> int:
    """`workers`: `auto` is one per visible GPU (one on CPU); more than the GPUs would share a device."""
    text = str(value).strip().lower()
    if text == "auto":
        return max(1, len(visible_gpus(device)))
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"workers {value!r}: expected auto or an integer >= 1")
    n = int(text)
    if device.type == "cuda" and n > len(visible_gpus(device)):
        raise ValueError(f"workers={n} exceeds the {len(visible_gpus(device))} visible GPU(s): timed cells never share a device")
    if n > 1 and isolate == "false":
        raise ValueError(f"workers={n} runs cells in worker processes; isolate=false contradicts it (use isolate=auto)")
    return n


def worker_threads(threads: int | None, workers: int) -> int | None:
    """CPU threads per worker: what was asked, else the cores shared out (two workers on 2 cores: one each)."""
    if threads:
        return int(threads)
    return max(1, (os.cpu_count() or 1) // workers) if workers > 1 else None
