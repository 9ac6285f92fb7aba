"""Huge-page CPU allocations: a large tensor faults per 2 MiB page, not per 4 KiB one, and rows can say so.

Run in child processes, because torch reads the switch once, at its first allocation. No timing is
asserted: page faults are counted (getrusage), which the kernel reports exactly.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.measure.allocator import thp_mode

CHILD = """
import resource
import bench  # first, as `python -m bench.run` imports it: sets the switch unless the environment has it
import torch
from bench.measure.allocator import cpu_thp_alloc
def faults_of_one_allocation():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.empty(64 * 2**20 // 4)
    x.fill_(1.0)  # touch every page
    del x
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(max(faults_of_one_allocation() for _ in range(3)), cpu_thp_alloc())
"""
PAGES = 64 * 2**20 // 4096
ROOT = Path(__file__).resolve().parent.parent
needs_thp = pytest.mark.skipif(thp_mode() not in ("always", "madvise"), reason="the kernel gives no huge pages")


def child(switch: str | None) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if switch is not None:
        env["THP_MEM_ALLOC_ENABLE"] = switch
    done = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stderr
    faults, thp = done.stdout.split()
    return int(faults), thp


@needs_thp
def test_bench_turns_huge_page_allocations_on_and_rows_can_say_so() -> None:
    faults, thp = child(None)
    assert thp == "True"
    assert faults < PAGES // 10, f"{faults} faults for a 64 MiB tensor: huge pages expected (~32)"


@needs_thp
def test_the_environment_can_turn_them_off() -> None:
    """The control: with the switch off, the same tensor is faulted in per 4 KiB page (unless THP is `always`)."""
    faults, thp = child("0")
    assert thp == "False"
    if thp_mode() == "madvise":
        assert faults >= PAGES // 2


def test_thp_mode_reads_the_kernels_choice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bench.measure import allocator

    mode = tmp_path / "enabled"
    mode.write_text("always [madvise] never\n")
    monkeypatch.setattr(allocator, "THP_MODE", mode)
    assert allocator.thp_mode() == "madvise"
    monkeypatch.setattr(allocator, "THP_MODE", tmp_path / "missing")
    assert allocator.thp_mode() is None
