"""Tasks, registered by name: `from tasks import get_task; get_task('scaling')`."""

from methods.registry import unknown
from tasks.base import Cell, RunContext, Task
from tasks.mqar import MQARTask
from tasks.needle import NeedleTask
from tasks.scaling import ScalingTask

TASKS: dict[str, Task] = {t.name: t for t in (ScalingTask(), NeedleTask(), MQARTask())}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise unknown("task", name, TASKS)
    return TASKS[name]


__all__ = ["TASKS", "Cell", "RunContext", "Task", "get_task"]
