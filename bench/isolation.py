"""The sweep's side of the worker processes (bench.worker): hand out groups, watch the clock, write what a
crash leaves.

A worker that segfaults, aborts, is OOM-killed or killed by hand costs the group it was measuring: the pool
writes those cells' rows (`error` or `oom`, with the signal as the reason), starts a fresh worker and goes
on. A group that runs past `cell_timeout_s` gets its worker killed and `timeout` rows. A worker's own
output goes to the sweep's log with its index; the last lines of its stderr go into an exit reason.
"""

from __future__ import annotations

import collections
import importlib.util
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.measure.provenance import REPO_ROOT
from bench.results import ResultsUnwritable
from bench.worker_protocol import cells_line, parse
from tasks import Cell

STARTUP_LIMIT_S = 600.0  # a worker that has not said `ready` by then is stuck importing (a dead NFS mount, ...)
POLL_S = 0.25
SIGNAL_NAMES = {
    signal.SIGSEGV: "segmentation fault",
    signal.SIGABRT: "aborted",
    signal.SIGBUS: "bus error",
    signal.SIGFPE: "floating-point exception",
    signal.SIGILL: "illegal instruction",
    signal.SIGKILL: "out of memory, or killed from outside",
}


def oom_kills() -> int | None:
    """The kernel's count of OOM kills so far (Linux /proc/vmstat); None where it cannot be read."""
    try:
        for line in Path("/proc/vmstat").read_text().splitlines():
            if line.startswith("oom_kill "):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def exit_reason(returncode: int, oom_rose: bool, stderr_tail: Sequence[str]) -> tuple[str, str]:
    """(status, reason) for a worker that died while measuring a group."""
    if returncode < 0:
        sig = signal.Signals(-returncode)
        if sig == signal.SIGKILL and oom_rose:
            return "oom", "worker killed by the kernel's OOM killer (SIGKILL) while measuring this cell"
        return "error", f"worker crashed ({sig.name}: {SIGNAL_NAMES.get(sig, 'signal')}) while measuring this cell"
    last = next((line.strip() for line in reversed(stderr_tail) if line.strip()), "")
    return "error", f"worker exited with code {returncode} while measuring this cell" + (f": {last}" if last else "")


def plugin_paths(plugins: Sequence[str]) -> list[str]:
    """The folders a worker needs on its path to import the run's plugin modules as the sweep did."""
    paths = []
    for name in plugins:
        spec = importlib.util.find_spec(name.split(".")[0])
        if spec is not None and spec.origin:
            top = Path(spec.origin).parent
            paths.append(str(top.parent if spec.submodule_search_locations else top))
    return paths


@dataclass
class Job:
    cells: list[Cell]
    started: float | None = None  # when the worker said `start` (its start-up does not count)
    oom_before: int | None = None
    written: set[str] = field(default_factory=set)


class Worker:
    """One worker slot: a process (restarted after a crash) and the group it is measuring."""

    def __init__(self, index: int, env: dict[str, str], events: queue.Queue) -> None:
        self.index, self.env, self.events = index, env, events
        self.proc: subprocess.Popen | None = None
        self.job: Job | None = None
        self.ready = False
        self.spawned = 0.0
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=8)

    def start(self, spec: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.worker", str(self.index)], env=self.env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, bufsize=1)  # fmt: skip
        self.ready, self.spawned = False, time.monotonic()
        self.stderr_tail.clear()
        threading.Thread(target=self._read_stdout, args=(self.proc,), daemon=True).start()
        threading.Thread(target=self._read_stderr, args=(self.proc,), daemon=True).start()
        self.proc.stdin.write(spec + "\n")
        self.proc.stdin.flush()

    def _read_stdout(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            if (msg := parse(line)) is not None:
                self.events.put((proc, "msg", msg))
            else:
                self.events.put((proc, "log", line.rstrip("\n")))
        self.events.put((proc, "eof", None))

    def _read_stderr(self, proc: subprocess.Popen) -> None:
        for line in proc.stderr:
            self.stderr_tail.append(line.rstrip("\n"))
            sys.stderr.write(f"[worker {self.index}] {line}")

    def send(self, cells: Sequence[Cell]) -> None:
        self.proc.stdin.write(cells_line(cells))
        self.proc.stdin.flush()

    def kill(self) -> int:
        proc, self.proc = self.proc, None
        if proc is None:
            return 0
        if proc.poll() is None:
            proc.kill()
        return proc.wait()


class WorkerPool:
    """`size` worker slots fed groups of cells. `on_rows(cells, worker)` is told of rows a worker wrote;
    `on_failure(cells, status, reason, worker)` writes the rows of a group that crashed or hung."""

    def __init__(self, size: int, spec: dict, timeout_s: float, gpus: Sequence[str],
                 on_rows: Callable[[list[Cell], int], None],
                 on_failure: Callable[[list[Cell], str, str, int], None], log: Callable[[str], None]) -> None:  # fmt: skip
        self.spec, self.timeout_s = json.dumps(spec), timeout_s
        self.on_rows, self.on_failure, self.log = on_rows, on_failure, log
        self.events: queue.Queue = queue.Queue()
        base = dict(os.environ, PYTHONUNBUFFERED="1")
        path = [str(REPO_ROOT), *plugin_paths(spec.get("plugins") or ()), base.get("PYTHONPATH", "")]
        base["PYTHONPATH"] = os.pathsep.join(p for p in path if p)
        self.workers = []
        for i in range(size):
            env = dict(base, CUDA_VISIBLE_DEVICES=gpus[i]) if gpus else base
            self.workers.append(Worker(i, env, self.events))

    def busy(self) -> int:
        return sum(w.job is not None for w in self.workers)

    def submit(self, cells: list[Cell]) -> None:
        """Give the group to an idle worker (waiting for one), starting a fresh process where none runs."""
        while self.busy() == len(self.workers):
            self.pump()
        worker = next(w for w in self.workers if w.job is None)
        if worker.proc is None or worker.proc.poll() is not None:
            worker.kill()
            worker.start(self.spec)
        worker.job = Job(list(cells), oom_before=oom_kills())
        try:
            worker.send(cells)
        except (BrokenPipeError, OSError):  # died between groups: its EOF, or the start-up check, ends the job
            pass

    def drain(self) -> None:
        """Wait until no worker is measuring anything."""
        while self.busy():
            self.pump()

    def close(self, kill: bool = False) -> None:
        """Let idle workers exit at the EOF of their input; `kill`: stop them now (the sweep is failing)."""
        for w in self.workers:
            if kill:
                w.kill()
            if w.proc is not None and w.proc.poll() is None:
                try:
                    w.proc.stdin.close()  # EOF: the worker exits after its (finished) loop
                    w.proc.wait(timeout=30)
                except (OSError, subprocess.TimeoutExpired):
                    w.kill()
            w.proc = None

    def pump(self) -> None:
        """Handle what the workers said within POLL_S, then kill any worker past its time limit."""
        try:
            self.handle(*self.events.get(timeout=POLL_S))
            while True:
                self.handle(*self.events.get_nowait())
        except queue.Empty:
            pass
        now = time.monotonic()
        for w in self.workers:
            if w.job is None or w.proc is None:
                continue
            if w.job.started is not None and now - w.job.started > self.timeout_s:
                w.kill()
                self.fail(w, "timeout", f"no result after {self.timeout_s:g} s (cell_timeout_s): the worker was killed")
            elif w.job.started is None and not w.ready and now - w.spawned > STARTUP_LIMIT_S:
                w.kill()
                self.fail(w, "error", f"the worker did not start within {STARTUP_LIMIT_S:g} s")

    def handle(self, proc: subprocess.Popen, kind: str, payload) -> None:
        worker = next((w for w in self.workers if w.proc is proc), None)
        if worker is None:
            return  # a process this pool already killed and replaced
        if kind == "log":
            self.log(f"  [worker {worker.index}] {payload}")
        elif kind == "eof":
            returncode = worker.kill()
            if worker.job is not None:
                oom = worker.job.oom_before is not None and (oom_kills() or 0) > worker.job.oom_before
                self.fail(worker, *exit_reason(returncode, oom, list(worker.stderr_tail)))
        elif payload["kind"] == "ready":
            worker.ready = True
        elif payload["kind"] == "start":
            worker.job.started = time.monotonic()
        elif payload["kind"] == "row":
            worker.job.written.add(payload["cell_id"])
        elif payload["kind"] == "done":
            job, worker.job = worker.job, None
            self.on_rows(job.cells, worker.index)
        elif payload["kind"] == "unwritable":
            raise ResultsUnwritable(payload["reason"])

    def fail(self, worker: Worker, status: str, reason: str) -> None:
        """Rows for the cells of the worker's group that it did not write, then the slot is free again."""
        job, worker.job = worker.job, None
        missing = [c for c in job.cells if c.cell_id not in job.written]
        self.log(f"  [worker {worker.index}] {status}: {reason}")
        if missing:
            self.on_failure(missing, status, reason, worker.index)
        if len(missing) < len(job.cells):
            self.on_rows([c for c in job.cells if c.cell_id in job.written], worker.index)
