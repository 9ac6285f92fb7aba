"""The command line: `python -m bench.run [-m] method=... impl=... task=... suite=... hardware=...`.

It plans the cells (bench.plan), has bench.sweep measure them into rows, and writes the report.

Names are checked before Hydra starts, so a typo fails at once with one line
listing the valid choices instead of a stack trace.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import sys
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from bench.measure.hardware import detect_device, resolve_profile
from bench.measure.provenance import REPO_ROOT, new_run_id
from bench.measure.timing import TimingConfig
from bench.plan import CONF_DIR, group_names, plan_cells, resolve_suite
from bench.sweep import RunSettings, run_cells
from methods import METHODS
from methods.registry import UnknownName, unknown

_RUN_ID: list[str] = []


def run_id() -> str:
    """One id per process (or ATTNBENCH_RUN_ID), so every job of a multirun writes to the same folder."""
    if not _RUN_ID:
        _RUN_ID.append(os.environ.get("ATTNBENCH_RUN_ID") or new_run_id())
    return _RUN_ID[0]


if not OmegaConf.has_resolver("attnbench_run_id"):
    OmegaConf.register_new_resolver("attnbench_run_id", run_id)


def _values(value: str) -> list[str]:
    """`a,b` (multirun) and `[a,b]` (a list) both name several values."""
    return [v.strip() for v in value.strip("[]").split(",") if v.strip()]


def validate_cli(argv: list[str]) -> None:
    """Reject unknown group names and impls before Hydra composes anything."""
    given: dict[str, list[str]] = {}
    for arg in argv:
        if "=" not in arg or arg.startswith(("hydra.", "+", "~", "-")):
            continue
        key, value = arg.split("=", 1)
        given[key] = _values(value)
    for group in ("method", "task", "hardware", "suite"):
        for name in given.get(group, []):
            if name not in group_names(group):
                raise unknown(group, name, group_names(group))
    for name in given.get("device", []):
        if name not in ("auto", "cpu", "cuda"):
            raise unknown("device", name, ["auto", "cpu", "cuda"])
    methods = given.get("method") or list(METHODS)
    for impl in given.get("impl", []):
        if impl == "null":
            continue
        known = {i for m in methods if m in METHODS for i in METHODS[m].impls}
        if impl not in known:
            raise unknown(f"impl of {'/'.join(methods)}", impl, known)


def update_latest(results_dir: Path) -> None:
    """`results/latest` points at the newest run folder under results/runs."""
    runs = (REPO_ROOT / "results" / "runs").resolve()
    target = results_dir.resolve()
    if target.parent != runs:
        return
    latest = REPO_ROOT / "results" / "latest"
    tmp = latest.with_name(".latest.tmp")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(Path("runs") / target.name)
    os.replace(tmp, latest)


def prepare_run(cfg: DictConfig, cli_task_keys: tuple[str, ...] = ()) -> tuple[list, RunSettings, dict]:
    """The cells a config names and the settings to measure them with; a bad name fails before anything runs."""
    device = detect_device(cfg.device)
    suite = resolve_suite(OmegaConf.to_container(cfg.suite, resolve=True), device)
    threads = cfg.get("threads") or suite.get("threads")
    if threads:  # before the CPU profile is measured, so peaks and rows agree
        torch.set_num_threads(int(threads))
    # Plan first: a bad name, parameter or key fails before anything is measured (the CPU profile included).
    planned = plan_cells(cfg, device, "", cli_task_keys)
    timing = TimingConfig.from_mapping({**(suite.get("timing") or {}), **OmegaConf.to_container(cfg.timing, resolve=True)})
    profile = resolve_profile(cfg.hardware, device)
    cells = [dataclasses.replace(cell, hardware=profile.name) for cell in planned]
    results_dir = Path(cfg.results_dir)
    if not results_dir.is_absolute():
        results_dir = Path.cwd() / results_dir
    settings = RunSettings(
        results_dir=results_dir,
        run_id=str(cfg.run_id),
        device=device,
        profile=profile,
        timing=timing,
        force=bool(cfg.force),
        measure_memory=bool(cfg.measure_memory),
        config_yaml=OmegaConf.to_yaml(cfg, resolve=True),
        cache_dir=Path(cfg.cache_dir).absolute() if cfg.get("cache_dir") else None,
    )
    return cells, settings, suite


def run(cfg: DictConfig, cli_task_keys: tuple[str, ...] = ()) -> list[dict]:
    """Measure every cell the config names and write the report; returns the rows written."""
    cells, settings, suite = prepare_run(cfg, cli_task_keys)
    results_dir = settings.results_dir
    results_dir.mkdir(parents=True, exist_ok=True)
    update_latest(results_dir)
    print(f"attnbench: {len(cells)} cells, suite {suite['name']}, device {settings.device}, "
          f"profile {settings.profile.name} -> {results_dir}")  # fmt: skip
    rows = run_cells(cells, settings)
    counts = collections.Counter(r["status"] for r in rows)
    noisy = sum(1 for r in rows if r.get("noisy"))
    print("attnbench: " + (", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "nothing new to measure")
          + (f"; {noisy} timed on a disturbed machine (noisy)" if noisy else ""))  # fmt: skip
    if cfg.report:
        from bench.report import write_report

        print(f"attnbench: report in {write_report(results_dir)}")
    return rows


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def hydra_main(cfg: DictConfig) -> None:
    overrides = HydraConfig.get().overrides.task
    cli_task_keys = tuple(o.split("=", 1)[0].removeprefix("task.") for o in overrides if o.startswith("task."))
    try:
        run(cfg, cli_task_keys)
    except (UnknownName, ValueError) as err:
        print(f"error: {str(err).splitlines()[0]}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    try:
        validate_cli(sys.argv[1:])
    except UnknownName as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    hydra_main()


if __name__ == "__main__":
    main()
