"""Is this machine quiet enough to benchmark on? `python -m bench.noise <cell overrides> --repeats 5`.

It measures the cells that the overrides name (the same overrides as `bench.run`: method, impl,
task, suite, `task.KEY=...`, threads, timing) `--repeats` times, each time as a fresh measurement,
and prints for each cell the run-to-run CV of its median latency, the interference probe's
readings (slowdown over its idle figure, attempts, noisy flags), and, with `--normalize-by`, the
CV of the same-run ratio to that implementation. The verdict says whether the machine is quiet
enough for a latency tolerance (default: bench.compare's per-method tolerance): no repeat was
flagged noisy and a 3-sigma run-to-run swing of every judged quantity stays inside the tolerance.

Exit codes: 0 quiet enough, 1 not quiet enough, 2 bad input (one line on stderr).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException

from bench.compare import Tolerances, yardstick
from bench.measure.interference import idle_probe_seconds, probe_seconds
from bench.plan import CONF_DIR
from bench.run import prepare_run, validate_cli
from bench.sweep import run_cells
from methods.registry import UnknownName

SIGMAS = 3.0  # a run-to-run swing of 3 CVs must stay inside the tolerance


def run_to_run_cv(values: Sequence[float]) -> float | None:
    """stdev / mean of one quantity over repeats; None for fewer than two values."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if len(values) < 2 or statistics.fmean(values) <= 0:
        return None
    return statistics.stdev(values) / statistics.fmean(values)


def cv_limit(tolerance: float) -> float:
    """The largest run-to-run CV whose 3-sigma swing stays inside a latency tolerance (1.15x -> 5%)."""
    return (tolerance - 1.0) / SIGMAS


@dataclasses.dataclass
class CellNoise:
    label: str
    medians_ms: list[float]
    slowdowns: list[float | None]
    waits: list[float | None]
    attempts: list[int]
    noisy: list[bool]
    ratios: list[float] = dataclasses.field(default_factory=list)  # over the yardstick, same run

    @property
    def cv(self) -> float | None:
        return run_to_run_cv(self.medians_ms)

    @property
    def ratio_cv(self) -> float | None:
        return run_to_run_cv(self.ratios)


def collect(runs: list[list[dict]], reference: str | None) -> list[CellNoise]:
    """One CellNoise per cell measured ok in every repeat, in the order of the first run."""
    out: dict[str, CellNoise] = {}
    for rows in runs:
        ref_by_point = {}
        if reference:
            for r in rows:
                if f"{r['method']}/{r['impl']}" == reference and r["status"] == "ok":
                    ref_by_point[_point_key(r)] = r["latency_ms"]
        for r in rows:
            if r["status"] != "ok" or r.get("latency_ms") is None:
                continue
            label = f"{r['method']}/{r['impl']} " + " ".join(f"{k}={r[k]}" for k in ("seq_len", "causal", "mode"))
            cell = out.setdefault(r["cell_id"], CellNoise(label, [], [], [], [], []))
            cell.medians_ms.append(float(r["latency_ms"]))
            cell.slowdowns.append(r.get("probe_slowdown"))
            cell.waits.append(r.get("runqueue_wait"))
            cell.attempts.append(int(r.get("measure_attempts") or 1))
            cell.noisy.append(bool(r.get("noisy")))
            ref = ref_by_point.get(_point_key(r))
            if ref and f"{r['method']}/{r['impl']}" != reference:
                cell.ratios.append(float(r["latency_ms"]) / float(ref))
    return [c for c in out.values() if len(c.medians_ms) == len(runs)]


def _point_key(row: dict) -> str:
    keys = [k for k in row.get("keys") or [] if k != "method_params"]
    return "|".join(str(row.get(k)) for k in [*keys, "task"])


def verdict(cells: list[CellNoise], tolerance: float) -> tuple[bool, str]:
    """(quiet enough, why): no noisy repeat, and every CV (ratios when normalised, else medians) under the limit."""
    limit = cv_limit(tolerance)
    noisy = sum(sum(c.noisy) for c in cells)
    if noisy:
        return False, f"{noisy} measurement(s) flagged noisy (interference probe or run-queue wait)"
    judged = [(c.label, c.ratio_cv if c.ratios else c.cv) for c in cells]
    worst = max(((label, cv) for label, cv in judged if cv is not None), key=lambda x: x[1], default=None)
    if worst is None:
        return False, "fewer than two ok repeats: nothing to judge"
    label, cv = worst
    quiet = cv <= limit
    return quiet, (f"largest run-to-run CV {cv:.1%} ({label}) {'<=' if quiet else '>'} {limit:.1%}, "
                   f"the limit for a {tolerance}x tolerance ({SIGMAS:g} sigma)")  # fmt: skip


def report(cells: list[CellNoise], reference: str | None, idle_s: float, now_s: float) -> str:
    lines = [f"probe: idle {idle_s * 1e3:.3f} ms per repeat, now {now_s * 1e3:.3f} ms ({now_s / idle_s:.2f}x idle)", ""]
    head = "| cell | median ms per repeat | CV | probe slowdown per repeat | run-queue wait | attempts | noisy |"
    rule = "|---|---|---|---|---|---|---|"
    if reference:
        head, rule = head + f" ratio to {reference} | ratio CV |", rule + "---|---|"
    lines += [head, rule]
    for c in cells:
        cv = "–" if c.cv is None else f"{c.cv:.1%}"
        slow = " ".join("–" if s is None else f"{s:.2f}" for s in c.slowdowns)
        wait = " ".join("–" if w is None else f"{w:.0%}" for w in c.waits)
        line = (f"| {c.label} | {' '.join(f'{m:.3f}' for m in c.medians_ms)} | {cv} | {slow} | {wait} | "
                f"{' '.join(map(str, c.attempts))} | {sum(c.noisy)} |")  # fmt: skip
        if reference:
            rcv = "–" if c.ratio_cv is None else f"{c.ratio_cv:.1%}"
            line += f" {' '.join(f'{r:.4f}' for r in c.ratios) or '–'} | {rcv} |"
        lines.append(line)
    return "\n".join(lines)


def measure(overrides: list[str], repeats: int) -> tuple[list[list[dict]], object]:
    """`repeats` fresh measurements of the cells the overrides name (rows kept in memory, written to a temp dir)."""
    validate_cli(overrides)
    cli_task_keys = tuple(o.split("=", 1)[0].removeprefix("task.") for o in overrides if o.startswith("task."))
    runs = []
    with tempfile.TemporaryDirectory(prefix="attnbench-noise-") as tmp:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("config", overrides=[*overrides, f"results_dir={tmp}", "force=true", "report=false"])
        cells, settings, _, _ = prepare_run(cfg, cli_task_keys)
        for i in range(repeats):
            settings = dataclasses.replace(settings, results_dir=Path(tmp) / f"repeat{i}", run_id=f"noise-{i}")
            runs.append(run_cells(cells, settings, log=lambda s: None))
            print(f"repeat {i + 1}/{repeats}: {len(runs[-1])} cells", file=sys.stderr)
    return runs, settings


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.noise", description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="cell overrides, as for bench.run (method=... task.seq_len=...)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tolerance", type=float, default=Tolerances.method_latency_ratio,
                        help="latency tolerance to judge against (default: bench.compare's per-method one)")
    parser.add_argument("--normalize-by", default=None, metavar="[METHOD/]IMPL",
                        help="also judge the same-run ratio to this implementation (e.g. sdpa)")
    args = parser.parse_args(argv)
    try:
        if args.repeats < 2:
            raise ValueError(f"--repeats must be >= 2 to measure run-to-run noise, got {args.repeats}")
        if not args.tolerance > 1:
            raise ValueError(f"--tolerance must be a slowdown factor > 1, got {args.tolerance}")
        runs, settings = measure(list(args.overrides), args.repeats)
        reference = None
        if args.normalize_by:
            import pandas as pd

            frame = pd.DataFrame([r for rows in runs for r in rows])
            reference = yardstick(args.normalize_by, frame)
    except (UnknownName, ValueError, HydraException) as err:
        print(f"error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2
    except SystemExit as err:  # bench.compare's BadInput: a yardstick that no row has
        print(f"error: {err.code}", file=sys.stderr)
        return 2
    cells = collect(runs, reference)
    idle = idle_probe_seconds(settings.device)
    print(report(cells, reference, idle, probe_seconds(settings.device)))
    quiet, why = verdict(cells, args.tolerance)
    print(f"\n{'quiet enough' if quiet else 'NOT quiet enough'}: {why}")
    return 0 if quiet else 1


if __name__ == "__main__":
    sys.exit(main())
