"""From a composed config to the list of cells a run measures.

Precedence, lowest first: the task's default point (conf/task), the suite's
sweep axes (conf/suite), then `task.KEY=...` given on the command line. A
method or task named on the command line narrows the suite to it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from methods import METHODS, get_impl, get_method, validate_params
from methods.registry import unknown
from tasks import get_task
from tasks.base import Cell

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def group_names(group: str, conf_dir: Path = CONF_DIR) -> list[str]:
    return sorted(p.stem for p in (conf_dir / group).glob("*.yaml"))


def load_group(group: str, name: str, conf_dir: Path = CONF_DIR) -> dict:
    path = conf_dir / group / f"{name}.yaml"
    if not path.exists():
        raise unknown(group, name, group_names(group, conf_dir))
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)


def resolve_suite(suite: Mapping, device: torch.device) -> dict:
    """`auto` becomes `gpu` on a CUDA device and `cpu` elsewhere."""
    suite = dict(suite)
    if suite.get("name") == "auto":
        suite = load_group("suite", "gpu" if device.type == "cuda" else "cpu")
    return suite


def _as_list(value) -> list | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    return list(value)


def select_methods(selector: str) -> list[str]:
    """The registered methods a suite entry names: `all`, `family=<family>`, or one method's name."""
    if selector == "all":
        return list(METHODS)
    if selector.startswith("family="):
        family = selector.removeprefix("family=")
        names = [m for m, spec in METHODS.items() if spec.family == family]
        if not names:
            raise ValueError(f"no method of family {family!r}; families: {', '.join(sorted({s.family for s in METHODS.values()}))}")
        return names
    get_method(selector)  # UnknownName with the choices
    return [selector]


def suite_method_entries(suite: Mapping) -> dict[str, dict]:
    """name -> {impls, params, strict} from a suite's `methods:`; `family=` overrides `all`, a name overrides both.

    Entries under `all` or `family=...` take only the listed impls each method has (`strict` False), so a
    new method joins the suite with its reference and kernel without an edit; a method named on its own
    must have every impl listed (`strict` True).
    """
    entries: dict[str, dict] = {}
    specificity = {"all": 0}  # `all`, then families, then names: the more specific entry wins
    items = sorted((suite.get("methods") or {}).items(), key=lambda kv: specificity.get(kv[0], 1 if "=" in kv[0] else 2))
    for selector, entry in items:
        entry = entry if isinstance(entry, Mapping) else {"impls": entry}
        for name in select_methods(selector):
            entries[name] = {"impls": entry.get("impls"), "params": dict(entry.get("params") or {}),
                             "strict": selector == name}  # fmt: skip
    return entries


def method_plan(cfg: Mapping, suite: Mapping) -> list[tuple[str, list[str], dict]]:
    """(method, impls, params) triples to run, validated against the registry before anything runs.

    Parameters: the method's declared defaults < its YAML < the suite's entry < the command line
    (`method.params.x=...`); `validate_params` rejects an unknown parameter or a bad value on one line.
    """
    impl_override = _as_list(cfg.get("impl"))
    method_cfg = cfg.get("method")
    suite_methods = suite_method_entries(suite)
    if method_cfg:
        name = method_cfg["name"]
        entry = suite_methods.get(name, {"impls": None, "strict": True})
        entries = {name: {**entry, "params": dict(method_cfg.get("params") or {})}}
    elif suite_methods:
        entries = {}
        for name, entry in suite_methods.items():
            params = dict(load_group("method", name).get("params") or {}) if name in group_names("method") else {}
            entries[name] = {**entry, "params": {**params, **entry["params"]}}
    else:
        raise ValueError(f"name a method (method=...) or a suite that lists methods; methods: {', '.join(group_names('method'))}")
    plan = []
    for name, entry in entries.items():
        spec = get_method(name)
        listed = entry["impls"]
        if impl_override:
            impls = impl_override
        elif listed is None:
            impls = list(spec.impls)
        elif entry["strict"]:
            impls = _as_list(listed)  # `[]` leaves the method out of the suite
        else:
            impls = [i for i in _as_list(listed) if i in spec.impls]
        if not impls:
            continue
        for impl in impls:
            get_impl(name, impl)
        plan.append((name, impls, validate_params(name, entry["params"])))
    return plan


def _sweep_blocks(entry) -> list[dict]:
    """A suite's entry for a task is one block of sweep axes, or a list of blocks (their union):
    e.g. forward up to 4096 tokens but forward+backward only up to 2048."""
    if entry is None:
        return [{}]
    if isinstance(entry, Mapping):
        return [dict(entry)]
    return [dict(block or {}) for block in entry]


def task_plan(cfg: Mapping, suite: Mapping, cli_task_keys: Sequence[str] = ()) -> list[tuple[str, dict, dict]]:
    """(task, default point, sweep axes) triples, one per sweep block.

    A block may carry `methods: [...]`: that block runs only for those methods (e.g. the
    expensive backward sweep for exact softmax alone); it stays in the axes for `plan_cells`."""
    task_cfg = cfg.get("task")
    suite_tasks = dict(suite.get("tasks") or {})
    if task_cfg:
        name = task_cfg["name"]
        defaults = {k: v for k, v in task_cfg.items() if k != "name"}
        cli = {k: defaults[k] for k in cli_task_keys if k in defaults}
        return [(name, defaults, {**block, **cli}) for block in _sweep_blocks(suite_tasks.get(name))]
    if not suite_tasks:
        raise ValueError(f"name a task (task=...) or a suite that lists tasks; tasks: {', '.join(group_names('task'))}")
    out = []
    for name, entry in suite_tasks.items():
        defaults = {k: v for k, v in load_group("task", name).items() if k != "name"}
        out.extend((name, defaults, block) for block in _sweep_blocks(entry))
    return out


def plan_cells(cfg: DictConfig | Mapping, device: torch.device, hardware: str, cli_task_keys: Sequence[str] = ()) -> list[Cell]:
    """Task, then point, then method, then impl: every implementation of a point runs back to back,
    so they share inputs and the oracle's answer.

    A method named on the command line runs on every sweep block of the suite, also on blocks that
    list other `methods:` (the user asked for it by name). A plan that selects no cell is an error
    that says why, never a run that measures nothing.
    """
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    suite = resolve_suite(cfg.get("suite") or {"name": "single"}, device)
    methods = method_plan(cfg, suite)
    named = bool(cfg.get("method"))
    cells: dict[str, Cell] = {}  # keyed by cell_id: overlapping sweep blocks measure a cell once
    for task_name, defaults, axes in task_plan(cfg, suite, cli_task_keys):
        task = get_task(task_name)
        axes = dict(axes)
        only = None if named else _as_list(axes.pop("methods", None))
        axes.pop("methods", None)
        for point in task.points(defaults, axes):
            for method, impls, params in methods:
                if only is not None and method not in only:
                    continue
                for impl in impls:
                    cell = Cell(method, impl, task_name, hardware, point, params, int(cfg.get("seed", 0)), suite["name"])
                    cells.setdefault(cell.cell_id, cell)
    if not cells:
        tasks = ", ".join(sorted({t for t, _, _ in task_plan(cfg, suite, cli_task_keys)}))
        raise ValueError(f"no cell selected: suite {suite['name']} gives task(s) {tasks} no point for "
                         f"method(s) {', '.join(m for m, _, _ in methods)}")  # fmt: skip
    return list(cells.values())
