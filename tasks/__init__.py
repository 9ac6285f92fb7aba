"""Tasks, found by discovery: importing this package imports every module of `tasks/`, and a module
registers its task with `@register_task`. `from tasks import get_task; get_task('scaling')`."""

import importlib
import pkgutil

from tasks.base import AttentionFactory, Cell, Metric, RunContext, Section, SummaryColumn, Task
from tasks.registry import TASKS, get_task, register_task, task_defaults

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")):
    importlib.import_module(f"{__name__}.{_module}")

__all__ = [
    "TASKS",
    "AttentionFactory",
    "Cell",
    "Metric",
    "RunContext",
    "Section",
    "SummaryColumn",
    "Task",
    "get_task",
    "register_task",
    "task_defaults",
]
