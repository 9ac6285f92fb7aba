"""What a task is to the runner: sweep points in, metric columns out.

A *cell* is one method implementation x one task x one hardware profile x one
sweep point. Its `cell_id` hashes exactly the keys that make it a different
measurement, so a re-run recognises finished cells and two runs can be
matched cell by cell.
"""

from __future__ import annotations

import abc
import hashlib
import itertools
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench.timing import TimingConfig
from methods.base import Attention

# The shape columns of every row (SDPA convention) and the other sweep keys every task understands.
SHAPE_KEYS = ("dtype", "batch", "heads", "seq_len", "kv_len", "head_dim", "causal", "mode")


@dataclass(frozen=True)
class Cell:
    method: str
    impl: str
    task: str
    hardware: str
    point: Mapping  # the sweep point: SHAPE_KEYS plus task-specific keys (depth, beta, ...)
    method_params: Mapping = field(default_factory=dict)
    seed: int = 0
    suite: str = "single"

    @property
    def cell_id(self) -> str:
        """Stable over runs: the suite is not part of it (the same cell in two suites is one measurement)."""
        key = {
            "method": self.method,
            "impl": self.impl,
            "task": self.task,
            "hardware": self.hardware,
            "point": dict(self.point),
            "method_params": dict(self.method_params),
            "seed": self.seed,
        }
        return hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def label(self) -> str:
        shown = " ".join(f"{k}={v}" for k, v in self.point.items())
        return f"{self.method}/{self.impl} {self.task} {shown}"


@dataclass
class RunContext:
    """Everything a task needs from the runner besides the cell."""

    device: torch.device
    timing: TimingConfig
    peak_tflops: float | None = None  # hardware profile's dense peak for the cell's dtype
    measure_memory: bool = True
    check_fidelity: bool = True
    checkpoint_dir: Path | None = None  # trained tasks checkpoint here, so an interrupted cell resumes


def torch_dtype(name: str) -> torch.dtype:
    try:
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}[
            name
        ]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose from: float32, float16, bfloat16, float64") from None


def expand_points(defaults: Mapping, axes: Mapping) -> Iterator[dict]:
    """Cartesian product of the sweep axes over the task's default point; scalars are one-value axes."""
    base = dict(defaults)
    base.update({k: v for k, v in axes.items() if not isinstance(v, list | tuple)})
    swept = {k: list(v) for k, v in axes.items() if isinstance(v, list | tuple)}
    swept.update({k: list(v) for k, v in base.items() if isinstance(v, list | tuple) and k not in swept})
    for k in swept:
        base.pop(k, None)
    names = list(swept)
    for values in itertools.product(*(swept[n] for n in names)):
        yield {**base, **dict(zip(names, values, strict=True))}


class Task(abc.ABC):
    """A task owns its data, its model recipe (if any) and its metric."""

    name: str = ""
    description: str = ""
    trained: bool = False

    def normalise_point(self, point: dict) -> dict | None:
        """Fill derived keys (e.g. kv_len) and drop impossible points (return None)."""
        return point

    def points(self, defaults: Mapping, axes: Mapping) -> list[dict]:
        out = []
        for point in expand_points(defaults, axes):
            point = self.normalise_point(dict(point))
            if point is not None and point not in out:
                out.append(point)
        return out

    @abc.abstractmethod
    def run_cell(self, cell: Cell, attn: Attention, ctx: RunContext) -> dict:
        """Measure one cell and return its metric columns.

        Raise `methods.Unsupported` for a cell the implementation cannot do,
        `bench.measure.WrongResult` for a result that fails its check; any other
        exception becomes an `error` row.
        """
