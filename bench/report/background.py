"""Figures drawn in a forked child while the parent builds the rest of the report.

Why: matplotlib is the report's largest cost and it is single-threaded. A
16-panel context-length figure of 60 lines takes 2-5 s (each text ~3 ms, each
tick a handful of artists), a 10,000-row campaign has three of them and a
100,000-row one nine, while the tables, the task sections and the other figures
need as long again: on two cores the two halves can overlap. A forked child
inherits the rows and the code (nothing is pickled), writes the PNG files and
exits; the parent waits for it before anything reads them (index.html embeds
them).

The files are the same either way (a test checks the bytes). Whenever forking
is not clearly safe or worth it - not Linux, one CPU, other Python threads
running, few rows - or the child fails, the figures are drawn in this process,
as they always were, so a failing figure raises here just as it did.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from types import TracebackType

MIN_ROWS = 2_000  # below this the figures take about a second: a fork is not worth it

Job = tuple[Callable[..., object], tuple]
_active: list[FigureDrawer] = []  # the drawer of the report being built, if any (see `draw`)


def draw(function: Callable[..., object], *args: object) -> None:
    """Draw a figure now, or hand it to the report's drawer when one is collecting.

    A task's `report_sections` calls this for its figures: under `bench.report` they may be drawn in a
    child while the report goes on; called on its own (a test, a notebook) it simply draws.
    """
    if _active:
        _active[-1].jobs.append((function, args))
    else:
        function(*args)


class FigureDrawer:
    """Collects figure jobs (a function and its arguments), draws batches of them in children, waits for them.

    Use as a context manager (it is then the drawer `draw` hands jobs to), so that a report that fails never
    leaves a child behind. Each `start` forks one child for the jobs collected since the last; `finish`
    waits for every child and draws here whatever a child failed to draw, and whatever was never started.
    """

    def __init__(self, min_rows: int | None = None) -> None:
        self.jobs: list[Job] = []
        self.min_rows = MIN_ROWS if min_rows is None else min_rows
        self.children: list[tuple[int, list[Job]]] = []

    def start(self, rows: int) -> None:
        """Fork a child for the jobs collected so far, when that is safe and worth it; else they wait for `finish`."""
        if not self.jobs or rows < self.min_rows or not self._can_fork():
            return
        sys.stdout.flush()
        sys.stderr.flush()
        jobs, self.jobs = self.jobs, []
        pid = os.fork()
        if pid == 0:  # the child: draw, then leave without running the parent's exit handlers
            code = 0
            try:
                for function, args in jobs:
                    function(*args)
            except BaseException:  # noqa: BLE001 - reported, then the parent draws again and raises if it must
                traceback.print_exc()
                code = 1
            finally:
                os._exit(code)
        self.children.append((pid, jobs))

    @staticmethod
    def _can_fork() -> bool:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        return sys.platform.startswith("linux") and cpus >= 2 and threading.active_count() == 1

    def finish(self) -> None:
        """Every job done: each child's work waited for, or (it failed) done here, and the jobs not started."""
        redo: list[Job] = []
        while self.children:
            pid, jobs = self.children.pop(0)
            _, status = os.waitpid(pid, 0)
            if os.waitstatus_to_exitcode(status) != 0:
                redo += jobs
        jobs, self.jobs = [*redo, *self.jobs], []
        for function, args in jobs:
            function(*args)

    def __enter__(self) -> FigureDrawer:
        _active.append(self)
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        _active.remove(self)
        for pid, _ in self.children:  # the report failed before `finish`: stop the children, reap them
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        self.children = []
