"""Every task, registered where it is defined (`@register_task`), found by importing the modules of `tasks/`."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from methods.registry import unknown
from tasks.base import Task

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
TASKS: dict[str, Task] = {}


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: one instance of the task, under its `name`."""
    if not cls.name:
        raise ValueError(f"task class {cls.__name__} has no name")
    if cls.name in TASKS and type(TASKS[cls.name]) is not cls:
        raise ValueError(f"task {cls.name!r} registered twice ({type(TASKS[cls.name]).__name__}, {cls.__name__})")
    TASKS[cls.name] = cls()
    return cls


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise unknown("task", name, TASKS)
    return TASKS[name]


def task_defaults(name: str, conf_dir: Path = CONF_DIR) -> dict:
    """The task's default point, from `conf/task/<name>.yaml`: the one place task defaults live."""
    path = conf_dir / "task" / f"{name}.yaml"
    if not path.exists():
        raise FileNotFoundError(f"task {name!r} has no defaults file {path}")
    cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    return {k: v for k, v in cfg.items() if k != "name"}
