"""`python -m bench.list`: every method with its implementations and capabilities, every task, suite and profile."""

from __future__ import annotations

import torch

from bench.plan import group_names, load_group
from methods import METHODS
from methods.registry import unavailable_reason
from tasks import TASKS


def _caps(caps) -> str:
    patterns = [name for name, ok in (("causal", caps.causal), ("non-causal", caps.non_causal)) if ok]
    patterns.append("self+cross" if caps.cross else "self only")
    extra = [name for name, ok in (("decode", caps.decode), ("backward", caps.backward)) if ok]
    dtypes = "/".join(d.replace("float", "fp").replace("bfp", "bf") for d in caps.dtypes)
    return ", ".join(patterns + extra + [dtypes])


def _impls(entry) -> str:
    """A suite's method entry is a list of impls or {impls: [...], params: {...}}; no impls means all."""
    impls = entry.get("impls") if isinstance(entry, dict) else entry
    return ",".join(impls) if impls else "all"


def listing(device: torch.device | None = None) -> str:
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    lines = [f"methods (availability on {device}):"]
    for spec in METHODS.values():
        swap = ", training-free" if spec.training_free else ""
        lines.append(f"  {spec.name} [{spec.family}{swap}] - {spec.description} ({spec.source})")
        for impl in spec.impls.values():
            reason = unavailable_reason(spec.name, impl.name, device)
            status = "available" if reason is None else f"unavailable: {reason}"
            lines.append(f"    {impl.name:<11} {impl.kind:<9} {_caps(impl.capabilities)}; {status}")
    lines.append("tasks:")
    for task in TASKS.values():
        lines.append(f"  {task.name:<12} {task.description}")
        lines.append(f"  {'':<12} keys: {', '.join(task.keys) or '-'}; headline: {task.metric(task.headline).header}")
    lines.append("suites:")
    for name in group_names("suite"):
        suite = load_group("suite", name)
        methods = ", ".join(f"{m}[{_impls(entry)}]" for m, entry in suite["methods"].items())
        tasks = ", ".join(suite["tasks"]) or "from the command line"
        lines.append(f"  {name:<8} methods: {methods or 'from the command line'}; tasks: {tasks}")
    lines.append("hardware profiles:")
    for name in group_names("hardware"):
        hw = load_group("hardware", name)
        peaks = hw.get("peak_tflops") or {}
        shown = ", ".join(f"{k} {v:g}" for k, v in peaks.items() if v) or "detected/measured at run time"
        lines.append(f"  {name:<10} {shown}")
    return "\n".join(lines)


def main() -> None:
    print(listing())


if __name__ == "__main__":
    main()
