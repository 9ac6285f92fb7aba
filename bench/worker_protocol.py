"""The wire between the sweep (bench.isolation.WorkerPool) and its worker processes (bench.worker).

One JSON object per line. The worker's stdin: the run's settings first (bench.sweep.settings_to_json),
then one group of cells per line (`cells_line`); EOF: exit. Its stdout: ordinary log lines, plus lines
starting with `MARK` that the pool reads (`message`, `parse`): `ready`, `start` (the group's cell ids),
`row` (a row written), `done` (the group's rows are written), `unwritable` (the results folder refused
a row: the sweep must stop).

Its own module so that both sides import it and neither imports the other.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from tasks import Cell

MARK = "\x1eattnbench-worker\x1e "  # starts a message line; never the start of a log line


def message(kind: str, **payload: object) -> str:
    return MARK + json.dumps({"kind": kind, **payload}) + "\n"


def parse(line: str) -> dict | None:
    """The message a line carries, or None for an ordinary log line."""
    return json.loads(line[len(MARK) :]) if line.startswith(MARK) else None


def cell_to_json(cell: Cell) -> dict:
    return {"method": cell.method, "impl": cell.impl, "task": cell.task, "hardware": cell.hardware,
            "point": dict(cell.point), "method_params": dict(cell.method_params), "seed": cell.seed,
            "suite": cell.suite, "cell_id": cell.cell_id}  # fmt: skip


def cell_from_json(data: dict) -> Cell:
    """A cell as the sweep sent it; its id must come out the same, or the worker would write another cell's row."""
    cell = Cell(data["method"], data["impl"], data["task"], data["hardware"], data["point"], data["method_params"],
                data["seed"], data["suite"])  # fmt: skip
    if cell.cell_id != data["cell_id"]:
        raise ValueError(f"cell {data['cell_id']} changed on its way to the worker (now {cell.cell_id})")
    return cell


def cells_line(cells: Sequence[Cell]) -> str:
    return json.dumps({"cells": [cell_to_json(c) for c in cells]}) + "\n"


def cells_of(line: str) -> list[Cell]:
    return [cell_from_json(c) for c in json.loads(line)["cells"]]
