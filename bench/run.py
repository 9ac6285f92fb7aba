"""The command line: `python -m bench.run [-m] method=... impl=... task=... suite=... hardware=...`.

It plans the cells (bench.plan), has bench.sweep measure them into rows, and writes the report.

Names are checked before Hydra starts, so a typo fails at once with one line
listing the valid choices instead of a stack trace.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import sys
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from bench.measure.files import atomic_write
from bench.measure.hardware import detect_device, resolve_profile
from bench.measure.provenance import REPO_ROOT, new_run_id
from bench.measure.timing import TimingConfig
from bench.plan import CONF_DIR, group_names, plan_cells, resolve_suite
from bench.results import ResultsUnwritable
from bench.schedule import parse_isolate, parse_shard, resolve_workers, shard_cells, worker_threads
from bench.sweep import RunSettings, run_cells
from methods import METHODS
from methods.registry import UnknownName, unknown

_RUN_ID: list[str] = []


UNFINISHED = ".unfinished"  # in a run folder until every cell of its sweep has a row; holds the command line


def unfinished_run(argv: list[str]) -> str | None:
    """The id of the newest run (results/latest) if it was stopped before its end by the same command line."""
    marker = REPO_ROOT / "results" / "latest" / UNFINISHED
    try:
        if json.loads(marker.read_text()).get("argv") == argv:
            return (REPO_ROOT / "results" / "latest").resolve().name
    except (OSError, ValueError, AttributeError):
        pass
    return None


def run_id() -> str:
    """One id per process (or ATTNBENCH_RUN_ID), so every job of a multirun writes to the same folder.

    With ATTNBENCH_RESUME=1 (`make bench`) a run killed before its end is taken up again by the same
    command: its folder is reused, so only the cells without a row run."""
    if not _RUN_ID:
        resumed = unfinished_run(sys.argv[1:]) if os.environ.get("ATTNBENCH_RESUME") == "1" else None
        if resumed:
            print(f"attnbench: resuming the unfinished run {resumed} (same command line)")
        _RUN_ID.append(os.environ.get("ATTNBENCH_RUN_ID") or resumed or new_run_id())
        # Jobs a launcher starts elsewhere (submitit: a subprocess, a Slurm node) inherit the environment,
        # so a sharded sweep writes one folder however its shards are spread.
        os.environ["ATTNBENCH_RUN_ID"] = _RUN_ID[0]
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


def prepare_run(cfg: DictConfig, cli_task_keys: tuple[str, ...] = ()) -> tuple[list, RunSettings, dict, list]:
    """The cells this process runs (its shard), the settings to measure them with, the suite, and every cell of
    the sweep (all shards); a bad name or option fails before anything runs."""
    device = detect_device(cfg.device)
    suite = resolve_suite(OmegaConf.to_container(cfg.suite, resolve=True), device)
    threads = cfg.get("threads") or suite.get("threads")
    if threads:  # before the CPU profile is measured, so peaks and rows agree
        torch.set_num_threads(int(threads))
    isolate = parse_isolate(cfg.get("isolate", "auto"))
    workers = resolve_workers(cfg.get("workers", "auto"), device, isolate)
    shard = parse_shard(cfg.get("shard"), cfg.get("shards"))
    # Plan first: a bad name, parameter or key fails before anything is measured (the CPU profile included).
    planned = plan_cells(cfg, device, "", cli_task_keys)
    timing = TimingConfig.from_mapping({**(suite.get("timing") or {}), **OmegaConf.to_container(cfg.timing, resolve=True)})
    profile = resolve_profile(cfg.hardware, device)
    every = [dataclasses.replace(cell, hardware=profile.name) for cell in planned]
    results_dir = Path(cfg.results_dir)
    if not results_dir.is_absolute():
        results_dir = Path.cwd() / results_dir
    timeout = cfg.get("cell_timeout_s") or suite.get("cell_timeout_s") or 3600.0
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
        isolate=isolate,
        cell_timeout_s=float(timeout),
        workers=workers,
        threads=worker_threads(threads, workers),
        shard=str(shard) if shard else None,
    )
    return shard_cells(every, shard), settings, suite, every


def open_results(results_dir: Path) -> None:
    """Create the folder and prove it takes a file, so a read-only or full folder fails before any cell runs."""
    try:
        results_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(results_dir / UNFINISHED, lambda tmp: Path(tmp).write_text(json.dumps({"argv": sys.argv[1:]})))
    except OSError as err:
        raise ResultsUnwritable(f"cannot write results to {results_dir}: {err.strerror or err}") from err


def sweep_complete(results_dir: Path, every: list) -> bool:
    """Whether every cell of the sweep (all shards) has a row of some status in the folder."""
    from bench.results import load_table

    table = load_table(results_dir, "warn", columns=["schema_version", "cell_id"])  # the ids only, not every column
    have = set() if table is None else set(table["cell_id"].to_pylist())
    return all(cell.cell_id in have for cell in every)


def run(cfg: DictConfig, cli_task_keys: tuple[str, ...] = ()) -> list[dict]:
    """Measure every cell the config names and write the report; returns the rows written.

    Whichever process finds the sweep complete (the run itself, or, sharded, the last shard to finish)
    compacts the folder and writes the report."""
    cells, settings, suite, every = prepare_run(cfg, cli_task_keys)
    results_dir = settings.results_dir
    open_results(results_dir)
    update_latest(results_dir)
    where = f", shard {settings.shard} of {len(every)} cells" if settings.shard else ""
    print(f"attnbench: {len(cells)} cells{where}, suite {suite['name']}, device {settings.device}, "
          f"profile {settings.profile.name}, {settings.workers} worker(s), isolate={settings.isolate} -> {results_dir}")  # fmt: skip
    rows = run_cells(cells, settings)
    counts = collections.Counter(r["status"] for r in rows)
    noisy = sum(1 for r in rows if r.get("noisy"))
    print("attnbench: " + (", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "nothing new to measure")
          + (f"; {noisy} timed on a disturbed machine (noisy)" if noisy else ""))  # fmt: skip
    if not sweep_complete(results_dir, every):
        print(f"attnbench: other shards still running; the last to finish writes the report ({results_dir})")
        return rows
    (results_dir / UNFINISHED).unlink(missing_ok=True)
    from bench.results import compact

    done = compact(results_dir)  # one file to read instead of one per cell (bench.results); safe beside writers
    if done.merged:
        print(f"attnbench: {done.merged} row files compacted into one ({done.rows} rows)")
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
    except (UnknownName, ValueError, ResultsUnwritable) as err:
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
