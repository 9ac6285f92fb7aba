"""Compare two results folders: `python -m bench.compare BASE CANDIDATE` prints a verdict and exits 0, 1 or 2.

Cells are matched by what they measure (method, impl, task, shape, method
parameters, task keys), never by run_id, cell_id or hardware, so a run on
another machine or another day still lines up with the baseline. Latency is
judged on the raw samples: the ratio of medians gets a bootstrap confidence
interval (fixed seed, so the verdict is reproducible), and only an interval
lying wholly beyond the tolerance is a regression; a noisy box widens the
interval instead of raising false alarms. `--normalize-by IMPL` divides every
latency by the same run's METHOD/IMPL latency at the same shape (`sdpa`: exact softmax's), which
cancels a slower machine or a busy CI runner.

A cell whose row on either side, or whose same-run yardstick row, was timed on a disturbed
machine (the runner's interference probe flagged it `noisy`, or NVML saw the GPU `throttled`;
see `bench.disturbed`) gets no latency verdict: its finding is `unjudged` with a detail starting
"not judged: disturbed", it is listed on its own, and it does not count toward its method's
verdict. Its accuracy, fidelity and status are still judged: load disturbs only the clock.

Normalising cancels a uniformly slower machine, not one whose per-op costs differ (a baseline from
another VM type put every reference method 1.2-1.8x off SDPA here). Rows name their machine (`device`
and the host CPU's `machine`); the summary says when the two sides differ, and `--same-machine` (CI's
choice) leaves such cells' latency unjudged ("not judged: other machine") instead of misjudging it.

Exit codes: 0 no regression, 1 regression, 2 bad input (missing, empty or
corrupt results, or nothing in common), with the one-line reason on stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from bench.declarations import key_columns, metric_declarations
from bench.disturbed import describe, is_disturbed
from bench.results import CorruptResults, load

# Identity of a cell: method, impl, task and the key columns the rows declare (bench.declarations).
# Hardware, run_id and cell_id are deliberately absent: two machines must match.
SHAPE_LABEL = ("dtype", "batch", "heads", "seq_len", "kv_len", "head_dim", "causal", "mode")  # in every label
BOOTSTRAP = 2000
SEED = 0
DISTURBED = "not judged: disturbed"  # how a disturbed cell's latency finding's detail starts
OTHER_MACHINE = "not judged: other machine"  # ... and that of a cell measured on another machine (--same-machine)


class BadInput(SystemExit):
    """Unusable input: a SystemExit so the CLI stops with exit code 2 and one line, not a traceback."""


@dataclass
class Tolerances:
    """What counts as a regression. Defaults chosen from repeated CPU smoke runs (see README)."""

    latency_ratio: float = 3.0  # one cell: regression when the whole CI of cand/base lies above this
    method_latency_ratio: float = 1.15  # one method/impl: the CI of the median of its cells' ratios
    min_cells: int = 3  # a method-level verdict needs this many judged cells
    # 90% for the method level: with ~10 cells, two cells that sped up for unrelated reasons (seen on this box)
    # pull the 0.5% quantile of a resampled median down to theirs; false alarms stay at zero (README).
    method_confidence: float = 0.90
    confidence: float = 0.99  # two-sided bootstrap interval
    min_latency_ms: float = 0.05  # baseline medians below this are timer noise: reported, never judged
    accuracy_drop: float = 0.02  # absolute drop in accuracy
    fidelity_rel: float = 0.5  # relative growth of fidelity error ...
    fidelity_abs: float = 1e-6  # ... beyond this absolute floor (errors near 0 fluctuate by ulps)


@dataclass
class Finding:
    """One judged difference of a matched cell."""

    cell: str
    kind: str  # latency | latency (method) | status | the name of a judged metric (accuracy, fidelity_rel, ...)
    verdict: str  # regression | improvement | ok | unjudged
    base: float | str | None
    cand: float | str | None
    detail: str
    ci: tuple[float, float] | None = None
    ratio: float | None = None
    base_cell_id: str | None = None
    cand_cell_id: str | None = None


@dataclass
class Comparison:
    base: str
    cand: str
    normalize_by: str | None
    tolerances: Tolerances
    matched: int = 0
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    base_machines: list[str] = field(default_factory=list)
    cand_machines: list[str] = field(default_factory=list)
    same_machine: bool = False  # latency judged only where both rows name the same machine

    @property
    def machines_differ(self) -> bool:
        """Both sides name their machines and no machine is on both sides."""
        return bool(self.base_machines and self.cand_machines) and not set(self.base_machines) & set(self.cand_machines)

    @property
    def other_machine(self) -> list[Finding]:
        """Latency findings left unjudged because the two rows were measured on different machines."""
        return [f for f in self.findings if is_other_machine_finding(f)]

    @property
    def regressions(self) -> list[Finding]:
        return [f for f in self.findings if f.verdict == "regression"]

    @property
    def improvements(self) -> list[Finding]:
        return [f for f in self.findings if f.verdict == "improvement"]

    @property
    def disturbed(self) -> list[Finding]:
        """Latency findings left unjudged because a row they rest on was timed on a disturbed machine."""
        return [f for f in self.findings if is_disturbed_finding(f)]

    def to_json(self) -> dict:
        return {
            "verdict": "regression" if self.regressions else "ok",
            "exit_code": 1 if self.regressions else 0,
            "base": self.base,
            "candidate": self.cand,
            "normalize_by": self.normalize_by,
            "tolerances": asdict(self.tolerances),
            "matched": self.matched,
            "added": self.added,
            "removed": self.removed,
            "regressions": [asdict(f) for f in self.regressions],
            "improvements": [asdict(f) for f in self.improvements],
            "changed": [asdict(f) for f in self.findings if f.verdict != "ok"],
            "disturbed": [asdict(f) for f in self.disturbed],
            "n_disturbed": len(self.disturbed),
            "machines": {"base": self.base_machines, "candidate": self.cand_machines},
            "n_other_machine": len(self.other_machine),
            "n_findings": len(self.findings),
        }


# ---------------------------------------------------------------- loading and keys


def load_side(path: Path | str, label: str) -> pd.DataFrame:
    """Every row of one side; BadInput with the reason when it is missing, empty or corrupt."""
    path = Path(path)
    if not path.exists():
        raise BadInput(f"{label} results {path} do not exist")
    try:
        df = load(path)
    except CorruptResults as err:
        raise BadInput(f"{label}: {err}") from err
    if df.empty:
        raise BadInput(f"{label} results {path} hold no result rows")
    return df


def key_text(v: object) -> str:
    """One canonical text per key value, so 1, 1.0 and '1' of two runs agree and missing is one value."""
    if v is None or (not isinstance(v, str) and pd.isna(v)):
        return ""
    if isinstance(v, bool | np.bool_):
        return str(bool(v))
    if isinstance(v, float | np.floating) and float(v).is_integer():
        return str(int(v))
    if isinstance(v, str) and v in ("{}", "null"):
        return ""
    return str(v)


def with_keys(df: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """The frame with `_key` (all keys, for matching) and `_ref` (the shape, for finding the same-run baseline)."""
    df = df.copy()
    for k in keys:
        if k not in df.columns:
            df[k] = None
    text = {k: df[k].map(key_text) for k in keys}
    df["_key"] = pd.Series([""] * len(df), index=df.index)
    for k in keys:
        df["_key"] = df["_key"] + "|" + text[k]
    ref_keys = [k for k in keys if k not in ("method", "impl", "method_params")]
    df["_ref"] = df["task"].map(key_text)
    for k in ref_keys:
        df["_ref"] = df["_ref"] + "|" + text[k]
    df["_label"] = label_of(df, keys)
    if "timestamp" in df.columns:
        df = df.sort_values("timestamp", kind="stable", na_position="first")
    return df.drop_duplicates("_key", keep="last").set_index("_key", drop=False)


def label_of(df: pd.DataFrame, keys: list[str]) -> pd.Series:
    """'softmax/sdpa scaling causal fwd float32 1×2×32 q=128 kv=128 input_dist=gaussian': a cell for humans."""
    causal = df["causal"].map(lambda v: "" if key_text(v) == "" else ("causal" if bool(v) else "non-causal"))
    text = (
        df["method"].astype(str) + "/" + df["impl"].astype(str) + " " + df["task"].map(key_text) + " " + causal
        + " " + df["mode"].map(key_text) + " " + df["dtype"].map(key_text)
        + " " + df["batch"].map(key_text) + "×" + df["heads"].map(key_text) + "×" + df["head_dim"].map(key_text)
        + " q=" + df["seq_len"].map(key_text) + " kv=" + df["kv_len"].map(key_text)
    )  # fmt: skip
    for k in (k for k in keys if k not in (*SHAPE_LABEL, "method", "impl", "task")):
        text = text + df[k].map(lambda v, k=k: f" {k}={key_text(v)}" if key_text(v) else "")
    return text.str.replace(r"\s+", " ", regex=True).str.strip()


# ---------------------------------------------------------------- statistics


def samples_of(row: pd.Series) -> np.ndarray:
    """Raw latency samples, or the median alone when samples were not kept (the interval then collapses)."""
    s = row.get("latency_samples_ms")
    arr = np.asarray(s if s is not None and not (isinstance(s, float) and math.isnan(s)) else [], dtype=float)
    arr = arr[np.isfinite(arr) & (arr > 0)]
    if arr.size == 0 and pd.notna(row.get("latency_ms")) and row["latency_ms"] > 0:
        arr = np.asarray([float(row["latency_ms"])])
    return arr


def boot_medians(samples: np.ndarray, rng: np.random.Generator, n: int = BOOTSTRAP) -> np.ndarray:
    """Medians of `n` resamples with replacement."""
    idx = rng.integers(0, samples.size, size=(n, samples.size))
    return np.median(samples[idx], axis=1)


def ratio_ci(
    base: np.ndarray,
    cand: np.ndarray,
    base_ref: np.ndarray | None = None,
    cand_ref: np.ndarray | None = None,
    confidence: float = 0.99,
    seed: int = SEED,
) -> tuple[float, float, float]:
    """(ratio, lo, hi): median(cand)/median(base), each optionally over its own run's reference median.

    A percentile bootstrap that resamples all four sample sets independently, so
    the reference's own noise widens the interval rather than hiding in it.
    """
    rng = np.random.default_rng(seed)
    point = float(np.median(cand) / np.median(base))
    boot = boot_medians(cand, rng) / boot_medians(base, rng)
    if base_ref is not None and cand_ref is not None:
        point *= float(np.median(base_ref) / np.median(cand_ref))
        boot = boot * boot_medians(base_ref, rng) / boot_medians(cand_ref, rng)
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(boot, [alpha, 1 - alpha])
    return point, float(lo), float(hi)


# ---------------------------------------------------------------- comparison


def yardstick(spec: str, *frames: pd.DataFrame) -> str:
    """`METHOD/IMPL` of the same-run yardstick. A bare `IMPL` names the exact method that has it (`sdpa`:
    exact softmax's SDPA), so the CLI stays short without this module naming a method."""
    if "/" in spec:
        return spec
    rows = pd.concat([f[["method", "impl", "exact"]] for f in frames if "exact" in f.columns], ignore_index=True)
    exact = rows[rows["impl"].eq(spec) & rows["exact"].eq(True)]
    methods = sorted(exact["method"].astype(str).unique())
    if len(methods) != 1:
        found = ", ".join(methods) or "none"
        raise BadInput(f"--normalize-by {spec}: needs exactly one exact method with impl {spec!r} (found: {found}); "
                       "give METHOD/IMPL")  # fmt: skip
    return f"{methods[0]}/{spec}"


def reference_rows(df: pd.DataFrame, reference: str) -> pd.DataFrame:
    """METHOD/IMPL ok rows of one run, indexed by shape: the same-run yardstick for every method."""
    method, _, impl = reference.partition("/")
    ref = df[df["method"].eq(method) & df["impl"].eq(impl) & df["status"].eq("ok")]
    return ref.drop_duplicates("_ref", keep="last").set_index("_ref", drop=False)


def judge_latency(
    b: pd.Series, c: pd.Series, tol: Tolerances, refs: tuple[pd.DataFrame, pd.DataFrame] | None, reference: str | None
) -> Finding | None:
    """Latency finding of one matched ok cell; None when either side has no latency."""
    bs, cs = samples_of(b), samples_of(c)
    if bs.size == 0 or cs.size == 0:
        return None
    cell = str(c["_label"])
    ids = {"base_cell_id": str(b["cell_id"]), "cand_cell_id": str(c["cell_id"])}
    base_ref = cand_ref = None
    if refs is not None:
        if f"{b['method']}/{b['impl']}" == reference:
            return None  # the yardstick itself: always 1.0 after normalization
        rb, rc = refs[0].get(b["_ref"]), refs[1].get(c["_ref"])
        if rb is None or rc is None or rb.size == 0 or rc.size == 0:
            return Finding(cell, "latency", "unjudged", float(np.median(bs)), float(np.median(cs)),
                           f"no {reference} row at this shape in both runs", **ids)  # fmt: skip
        base_ref, cand_ref = rb, rc
    if float(np.median(bs)) < tol.min_latency_ms:
        return Finding(cell, "latency", "unjudged", float(np.median(bs)), float(np.median(cs)),
                       f"baseline median below the {tol.min_latency_ms} ms noise floor", **ids)  # fmt: skip
    ratio, lo, hi = ratio_ci(bs, cs, base_ref, cand_ref, tol.confidence)
    if lo > tol.latency_ratio:
        verdict = "regression"
    elif hi < 1 / tol.latency_ratio:
        verdict = "improvement"
    else:
        verdict = "ok"
    what = "normalized latency ratio" if refs is not None else "latency ratio"
    detail = f"{what} {ratio:.2f}x [{lo:.2f}, {hi:.2f}] (tolerance {tol.latency_ratio}x)"
    return Finding(cell, "latency", verdict, float(np.median(bs)), float(np.median(cs)), detail, (lo, hi), ratio,
                   **ids)  # fmt: skip


def disturbance(
    b: pd.Series, c: pd.Series, ref_noise: tuple[dict[str, str], dict[str, str]] | None, reference: str | None
) -> str | None:
    """Why a matched cell's latency cannot be judged because of load, or None when nothing disturbed it.

    'not judged: disturbed (candidate probe 3.1x slower than idle)' when either side's row was timed on a
    disturbed machine; '... disturbed yardstick (softmax/sdpa base probe 2.4x slower than idle)' when the
    same-run yardstick it is divided by was: a disturbed yardstick skews the ratio as much as a disturbed cell.
    """
    own = [f"{side} {describe(row)}" for side, row in (("base", b), ("candidate", c)) if is_disturbed(row)]
    why = [f"({'; '.join(own)})"] if own else []
    if ref_noise is not None:
        sides = (("base", ref_noise[0].get(b["_ref"])), ("candidate", ref_noise[1].get(c["_ref"])))
        refs = [f"{side} {text}" for side, text in sides if text]
        if refs:
            why.append(f"yardstick ({reference} {'; '.join(refs)})")
    return f"{DISTURBED} {'; disturbed '.join(why)}" if why else None


def machine_of(row: pd.Series) -> str | None:
    """The machine a row was measured on ("cpu: AMD EPYC; AuthenticAMD family 26 model 2 ..."); None for rows
    written before rows named their host CPU, which are judged as before."""
    machine = row.get("machine")
    if machine is None or pd.isna(machine):
        return None
    return f"{row.get('device')}; {machine}"


def machines(df: pd.DataFrame) -> list[str]:
    """The machines one side's rows name (none for rows that do not)."""
    if "machine" not in df.columns:
        return []
    named = df.loc[df["machine"].notna(), ["device", "machine"]].drop_duplicates()
    return sorted(machine_of(row) for _, row in named.iterrows())


def other_machine(b: pd.Series, c: pd.Series) -> str | None:
    """Why a matched cell's latency is not judged under --same-machine, or None when both rows share a machine."""
    mb, mc = machine_of(b), machine_of(c)
    if mb is None or mc is None or mb == mc:
        return None
    return f"{OTHER_MACHINE} (base {mb}; candidate {mc})"


def not_judged(lat: Finding, why: str) -> Finding:
    """The latency finding of a disturbed cell: unjudged, no ratio or interval (so no method verdict counts
    it), the measured ratio kept in the detail for a reader."""
    return Finding(lat.cell, "latency", "unjudged", lat.base, lat.cand, f"{why}; as measured: {lat.detail}",
                   base_cell_id=lat.base_cell_id, cand_cell_id=lat.cand_cell_id)  # fmt: skip


def _unjudged_because(f: Finding, why: str) -> bool:
    return f.kind == "latency" and f.verdict == "unjudged" and f.detail.startswith(why)


def is_other_machine_finding(f: Finding) -> bool:
    """A latency finding left unjudged because its rows were measured on different machines (`other_machine`)."""
    return _unjudged_because(f, OTHER_MACHINE)


def is_disturbed_finding(f: Finding) -> bool:
    """A latency finding left unjudged because a row it rests on was disturbed (`disturbance`)."""
    return _unjudged_because(f, DISTURBED)


def judge_metrics(b: pd.Series, c: pd.Series, tol: Tolerances, declared: dict[str, dict]) -> list[Finding]:
    """Findings of one matched ok cell for every metric its task declares a judge for (besides latency).

    `drop`: an absolute fall beyond `accuracy_drop` (accuracies, hit rates); `growth`: a relative rise
    beyond `fidelity_rel` above the `fidelity_abs` floor (errors), mirrored when the metric is better higher.
    """
    out = []
    cell = str(c["_label"])
    ids = {"base_cell_id": str(b["cell_id"]), "cand_cell_id": str(c["cell_id"])}
    for name, spec in declared.items():
        bv, cv = b.get(name), c.get(name)
        if spec.get("judge") not in ("drop", "growth") or not (_is_number(bv) and _is_number(cv)):
            continue
        bv, cv = float(bv), float(cv)
        worse = (bv - cv) if spec.get("better") == "higher" else (cv - bv)  # > 0: the candidate is worse
        if spec["judge"] == "drop":
            verdict = "regression" if worse > tol.accuracy_drop else "improvement" if -worse > tol.accuracy_drop else "ok"
            detail = f"{name} {bv:.4f} -> {cv:.4f} (tolerance {tol.accuracy_drop})"
        else:
            limit = bv * (1 + tol.fidelity_rel) + tol.fidelity_abs
            better = cv * (1 + tol.fidelity_rel) + tol.fidelity_abs < bv
            if spec.get("better") == "higher":  # a score that should not shrink: the same rule, mirrored
                limit = (bv - tol.fidelity_abs) / (1 + tol.fidelity_rel)
                regressed, better = cv < limit, (cv - tol.fidelity_abs) / (1 + tol.fidelity_rel) > bv
            else:
                regressed = cv > limit
            verdict = "regression" if regressed else "improvement" if better else "ok"
            detail = f"{name} {bv:.2e} -> {cv:.2e} (limit {limit:.2e})"
        out.append(Finding(cell, name, verdict, bv, cv, detail, **ids))
    return out


def _is_number(v: object) -> bool:
    return isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool) and math.isfinite(float(v))


def compare_frames(
    base: pd.DataFrame,
    cand: pd.DataFrame,
    tol: Tolerances | None = None,
    normalize_by: str | None = None,
    base_name: str = "base",
    cand_name: str = "candidate",
    same_machine: bool = False,
) -> Comparison:
    """The comparison of two sets of rows; pure (no I/O), so tests can build rows by hand."""
    tol = tol or Tolerances()
    keys = key_columns(base, cand)
    declared = metric_declarations(cand, base)
    b, c = with_keys(base, keys), with_keys(cand, keys)
    normalize_by = yardstick(normalize_by, base, cand) if normalize_by else None
    result = Comparison(base_name, cand_name, normalize_by, tol, base_machines=machines(base),
                        cand_machines=machines(cand), same_machine=same_machine)  # fmt: skip
    result.added = sorted(c.loc[c.index.difference(b.index), "_label"])
    result.removed = sorted(b.loc[b.index.difference(c.index), "_label"])
    common = b.index.intersection(c.index)
    result.matched = len(common)
    refs = ref_noise = None
    if normalize_by:
        rb, rc = reference_rows(b, normalize_by), reference_rows(c, normalize_by)
        refs = ({k: samples_of(r) for k, r in rb.iterrows()}, {k: samples_of(r) for k, r in rc.iterrows()})
        ref_noise = tuple({k: describe(r) for k, r in side.iterrows() if is_disturbed(r)} for side in (rb, rc))
    for key in sorted(common):
        br, cr = b.loc[key], c.loc[key]
        bst, cst = str(br["status"]), str(cr["status"])
        ids = {"base_cell_id": str(br["cell_id"]), "cand_cell_id": str(cr["cell_id"])}
        if bst == "ok" and cst != "ok":
            reason = str(cr.get("reason") or "")
            result.findings.append(Finding(str(cr["_label"]), "status", "regression", bst, cst,
                                           f"ok -> {cst}: {reason}".rstrip(": "), **ids))  # fmt: skip
            continue
        if bst != "ok" and cst == "ok":
            result.findings.append(Finding(str(cr["_label"]), "status", "improvement", bst, cst, f"{bst} -> ok", **ids))
            continue
        if bst != "ok":
            if bst != cst:
                result.findings.append(Finding(str(cr["_label"]), "status", "ok", bst, cst, f"{bst} -> {cst}", **ids))
            continue
        lat = judge_latency(br, cr, tol, refs, normalize_by)
        if lat is not None and same_machine and (why := other_machine(br, cr)):
            lat = not_judged(lat, why)
        elif lat is not None and (why := disturbance(br, cr, ref_noise, normalize_by)):
            lat = not_judged(lat, why)
        if lat is not None:
            result.findings.append(lat)
        result.findings.extend(judge_metrics(br, cr, tol, declared))
    result.findings.extend(method_findings(result.findings, tol, normalize_by is not None))
    return result


def method_findings(findings: list[Finding], tol: Tolerances, normalized: bool) -> list[Finding]:
    """One latency verdict per method/impl: the median of its cells' ratios, bootstrapped over cells.

    Why: on a busy machine one cell now and then runs during a burst of load
    and comes out 2x slow with a tight interval (its own samples all share the
    burst), so a per-cell tolerance low enough to catch a 2x slowdown raises
    false alarms. A change in a method's code moves all of its cells; a burst
    moves one. The median over cells ignores the burst and sees the change.
    Unjudged cells (below the noise floor, no yardstick, disturbed) carry no ratio and do not count:
    a disturbed cell's ratio measures the load, not the code.
    """
    by: dict[str, list[float]] = {}
    for f in findings:
        if f.kind == "latency" and f.ratio is not None and f.verdict != "unjudged":
            by.setdefault(f.cell.split(" ")[0], []).append(f.ratio)
    out = []
    rng = np.random.default_rng(SEED)
    alpha = (1 - tol.method_confidence) / 2
    for name, ratios in sorted(by.items()):
        if len(ratios) < tol.min_cells:
            continue
        r = np.log(np.asarray(ratios))
        boot = np.median(r[rng.integers(0, r.size, size=(BOOTSTRAP, r.size))], axis=1)
        med, lo, hi = (float(np.exp(x)) for x in (np.median(r), *np.quantile(boot, [alpha, 1 - alpha])))
        if lo > tol.method_latency_ratio:
            verdict = "regression"
        elif hi < 1 / tol.method_latency_ratio:
            verdict = "improvement"
        else:
            verdict = "ok"
        what = "normalized latency" if normalized else "latency"
        detail = (f"median {what} ratio over {len(ratios)} cells {med:.2f}x [{lo:.2f}, {hi:.2f}] "
                  f"(tolerance {tol.method_latency_ratio}x)")  # fmt: skip
        out.append(Finding(f"{name} (all judged cells)", "latency (method)", verdict, None, None, detail, (lo, hi), med))
    return out


def compare(
    base: Path | str,
    cand: Path | str,
    tol: Tolerances | None = None,
    normalize_by: str | None = None,
    same_machine: bool = False,
) -> Comparison:
    """Load both folders and compare them; BadInput when either is unusable or they share no cell."""
    bdf, cdf = load_side(base, "base"), load_side(cand, "candidate")
    result = compare_frames(bdf, cdf, tol, normalize_by, str(base), str(cand), same_machine)
    if result.matched == 0:
        raise BadInput(f"base {base} and candidate {cand} have no cell in common (different suites or tasks?)")
    return result


# ---------------------------------------------------------------- output


def md_cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def fmt(v: object) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def findings_table(findings: list[Finding]) -> str:
    lines = ["| cell | what | base | candidate | detail |", "|---|---|---|---|---|"]
    for f in findings:
        lines.append(f"| {md_cell(f.cell)} | {f.kind} | {fmt(f.base)} | {fmt(f.cand)} | {md_cell(f.detail)} |")
    return "\n".join(lines) + "\n"


def to_markdown(result: Comparison, max_listed: int = 50) -> str:
    """A PR-comment-ready summary: the verdict first, then regressions, improvements, the cells not judged
    because disturbed, added and removed cells."""
    regs, imps, disturbed = result.regressions, result.improvements, result.disturbed
    other = result.other_machine
    unjudged = [f for f in result.findings
                if f.verdict == "unjudged" and not is_disturbed_finding(f) and not is_other_machine_finding(f)]  # fmt: skip
    lat = [f for f in result.findings if f.kind == "latency" and f.ci is not None]
    methods = [f for f in result.findings if f.kind == "latency (method)"]
    head = "❌ **Regression**" if regs else "✅ **No regression**"
    not_judged_text = f"; {len(disturbed)} cell(s) not judged: disturbed (timed on a busy or throttled machine)"
    not_judged_text = not_judged_text if disturbed else ""
    if other:
        not_judged_text += f"; {len(other)} cell(s) not judged: other machine"
    tol = result.tolerances
    lines = [
        "## attnbench compare\n",
        f"{head}: {len(regs)} regression(s), {len(imps)} improvement(s) over {result.matched} matched cells; "
        f"{len(result.added)} added, {len(result.removed)} removed{not_judged_text}.\n",
        f"- base: `{result.base}`\n- candidate: `{result.cand}`",
        f"- latency: {'normalized by the same run’s ' + result.normalize_by if result.normalize_by else 'raw'}"
        f"; regression when the {tol.confidence:.0%} bootstrap interval of the median ratio lies above "
        f"{tol.latency_ratio}x per cell, or the {tol.method_confidence:.0%} interval of the median over a method's cells above "
        f"{tol.method_latency_ratio}x; "
        f"baseline medians under {tol.min_latency_ms} ms not judged ({len(unjudged)} cells "
        f"unjudged, {len(lat)} judged); {len(disturbed)} cells not judged: disturbed (the interference probe "
        "flagged a row, or its yardstick's, noisy or GPU-throttled; not counted toward a method's verdict)",
        f"- accuracy: drop > {tol.accuracy_drop}; fidelity: relative error > base × {1 + tol.fidelity_rel:g} "
        f"+ {tol.fidelity_abs:g}; status: ok → anything else\n",
    ]
    if result.machines_differ:
        consequence = ("latency not judged (--same-machine)" if result.same_machine else
                       "latency ratios compare the machines as well as the code; rebuild the baseline on this machine "
                       "type or pass --same-machine")  # fmt: skip
        lines.insert(3, f"- ⚠ measured on different machines: base {', '.join(result.base_machines)}; candidate "
                        f"{', '.join(result.cand_machines)}: {consequence}")  # fmt: skip
    for title, items in (("Regressions", regs), ("Improvements", imps), ("Not judged: disturbed", disturbed)):
        if items:
            lines.append(f"### {title} ({len(items)})\n")
            lines.append(findings_table(items[:max_listed]))
            if len(items) > max_listed:
                lines.append(f"… and {len(items) - max_listed} more (see the JSON verdict).\n")
    for title, items in (("Added cells", result.added), ("Removed cells", result.removed)):
        if items:
            lines.append(f"### {title} ({len(items)})\n")
            lines.extend(f"- {md_cell(i)}" for i in items[:max_listed])
            if len(items) > max_listed:
                lines.append(f"- … and {len(items) - max_listed} more")
            lines.append("")
    if methods:
        lines.append(f"### Latency per method ({len(methods)})\n")
        lines.append(findings_table(sorted(methods, key=lambda f: -(f.ratio or 0))))
    if lat:
        worst = max(lat, key=lambda f: f.ci[0] if f.ci else 0)
        lines.append(f"Largest latency change (by interval lower bound): {md_cell(worst.cell)}: {worst.detail}\n")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: Markdown on stdout (or --json - for JSON), 0 no regression, 1 regression, 2 bad input."""
    parser = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.splitlines()[0])
    parser.add_argument("base", type=Path, help="baseline results folder")
    parser.add_argument("candidate", type=Path, help="candidate results folder")
    parser.add_argument("--normalize-by", default=None, metavar="[METHOD/]IMPL",
                        help="divide latencies by the same run's METHOD/IMPL at the same shape; a bare IMPL (e.g. sdpa) "
                             "names the exact method that has it")  # fmt: skip
    parser.add_argument("--latency-tol", type=float, default=Tolerances.latency_ratio,
                        help="per-cell ratio whose excess (whole interval beyond it) is a regression")
    parser.add_argument("--method-latency-tol", type=float, default=Tolerances.method_latency_ratio,
                        help="per-method ratio (median over the method's cells)")
    parser.add_argument("--min-cells", type=int, default=Tolerances.min_cells)
    parser.add_argument("--method-confidence", type=float, default=Tolerances.method_confidence)
    parser.add_argument("--confidence", type=float, default=Tolerances.confidence)
    parser.add_argument("--min-latency-ms", type=float, default=Tolerances.min_latency_ms)
    parser.add_argument("--accuracy-tol", type=float, default=Tolerances.accuracy_drop)
    parser.add_argument("--fidelity-rel-tol", type=float, default=Tolerances.fidelity_rel)
    parser.add_argument("--fidelity-abs-tol", type=float, default=Tolerances.fidelity_abs)
    parser.add_argument("--fail-on-removed", action="store_true", help="a cell missing from the candidate fails")
    parser.add_argument("--same-machine", action="store_true",
                        help="judge latency only where both rows name the same machine (others: 'not judged: other "
                             "machine'); accuracy, fidelity and status are judged everywhere")  # fmt: skip
    parser.add_argument("--json", default=None, metavar="PATH", help="write the JSON verdict here ('-': stdout)")
    parser.add_argument("--markdown", default=None, metavar="PATH", help="also write the Markdown summary here")
    args = parser.parse_args(argv)
    tol = Tolerances(args.latency_tol, args.method_latency_tol,
                     args.min_cells, args.method_confidence, args.confidence, args.min_latency_ms, args.accuracy_tol,
                     args.fidelity_rel_tol, args.fidelity_abs_tol)  # fmt: skip
    try:
        result = compare(args.base, args.candidate, tol, args.normalize_by, args.same_machine)
    except BadInput as err:
        print(f"error: {err.code}", file=sys.stderr)
        return 2
    verdict = result.to_json()
    code = verdict["exit_code"]
    if args.fail_on_removed and result.removed:
        code = verdict["exit_code"] = 1
        verdict["verdict"] = "regression"
    text = to_markdown(result)
    if args.markdown:
        Path(args.markdown).write_text(text)
    if args.json == "-":
        print(json.dumps(verdict, indent=1, default=str))
    else:
        print(text)
        if args.json:
            Path(args.json).write_text(json.dumps(verdict, indent=1, default=str))
    return code


if __name__ == "__main__":
    sys.exit(main())
