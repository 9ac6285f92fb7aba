"""A worker process: `python -m bench.worker INDEX`, started and fed by bench.isolation.WorkerPool.

Why a fresh interpreter and not a fork: a forked child of a process that initialised CUDA or OpenMP can
hang or crash, and the parent has done both. The worker imports the harness once and then measures group
after group, so its start-up (a second or two) is paid once per worker, not once per cell.

The protocol is bench.worker_protocol. The worker writes its rows itself, atomically; what a crash leaves
unwritten the pool writes as failure rows.
"""

from __future__ import annotations

import ctypes
import faulthandler
import importlib
import json
import signal
import sys

from bench.worker_protocol import cells_of, message

PR_SET_PDEATHSIG = 1


def send(kind: str, **payload) -> None:
    sys.stdout.write(message(kind, **payload))
    sys.stdout.flush()


def die_with_parent() -> None:
    """Linux: SIGKILL this worker when the sweep that started it dies (kill -9 of the sweep leaves no orphan
    measuring on). Elsewhere the worker stops at the EOF of its stdin, after its current group."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def main(argv: list[str]) -> int:
    die_with_parent()
    faulthandler.enable()  # a segfault prints the Python stack to stderr, which the pool forwards
    index = int(argv[0])
    spec = json.loads(sys.stdin.readline())
    for module in spec.get("plugins") or ():  # methods or tasks registered outside the tree (and test faults)
        importlib.import_module(module)

    import torch

    from bench.results import ResultsUnwritable, write_rows
    from bench.sweep import measure_group, settings_from_json

    settings = settings_from_json(spec, worker=index)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    send("ready")
    for line in sys.stdin:
        cells = cells_of(line)
        send("start", cells=[c.cell_id for c in cells])
        rows = measure_group(cells, settings)
        try:
            write_rows(settings.results_dir, rows, on_write=lambda row: send("row", cell_id=row["cell_id"]))
        except ResultsUnwritable as err:
            send("unwritable", reason=str(err))
            return 3
        send("done", cells=[c.cell_id for c in cells])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
