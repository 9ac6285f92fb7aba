"""bench.compare verdicts on constructed result sets: noise passes, real shifts fail, bad input exits 2."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import make_row

from bench import compare
from bench.declarations import key_columns
from bench.results import write_row

METHODS = ("softmax/sdpa", "softmax/reference", "linear/reference", "sliding_window/reference")
LENGTHS = (512, 1024, 2048, 4096)


def campaign(
    seed: int, scale: dict[str, float] | None = None, machine: float = 1.0, n: int = 15, noise: float = 0.1
) -> list[dict]:
    """Rows of a small sweep: every method at 4 lengths x 2 patterns, lognormal samples around a fixed median."""
    rng = np.random.default_rng(seed)
    rows = []
    for name in METHODS:
        method, impl = name.split("/")
        for kv in LENGTHS:
            for causal in (True, False):
                median = (1.0 + METHODS.index(name)) * kv / 512 * machine * (scale or {}).get(name, 1.0)
                samples = (median * rng.lognormal(0, noise, n)).tolist()
                rows.append(
                    make_row(
                        f"{seed}-{method}-{impl}-{kv}-{causal}", method=method, impl=impl, seq_len=kv, kv_len=kv,
                        causal=causal, latency_ms=float(np.median(samples)), latency_samples_ms=samples,
                        run_id=f"run-{seed}", hardware=f"machine-{seed}", fidelity_rel=1e-3, accuracy=0.9,
                    )  # fmt: skip
                )
    return rows


def frame(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows)


def test_pure_noise_is_not_a_regression() -> None:
    for seed in range(1, 6):
        result = compare.compare_frames(frame(campaign(0)), frame(campaign(seed)), normalize_by="sdpa")
        assert result.matched == len(METHODS) * len(LENGTHS) * 2  # matched despite other run_id, hardware, cell_id
        assert result.regressions == [], [r.detail for r in result.regressions]


def test_method_slowdown_is_a_regression_and_names_the_method() -> None:
    result = compare.compare_frames(frame(campaign(0)), frame(campaign(1, {"linear/reference": 2.0})), normalize_by="sdpa")
    regs = result.regressions
    assert [r.cell for r in regs] == ["linear/reference (all judged cells)"]
    assert regs[0].kind == "latency (method)" and regs[0].ci[0] > 1.5


def test_single_cell_large_shift_is_a_regression() -> None:
    base, cand = campaign(0), campaign(1)
    victim = next(r for r in cand if r["method"] == "linear" and r["kv_len"] == 4096 and r["causal"])
    victim["latency_samples_ms"] = [x * 5 for x in victim["latency_samples_ms"]]
    result = compare.compare_frames(frame(base), frame(cand), normalize_by="sdpa")
    assert [(r.kind, "kv=4096" in r.cell) for r in result.regressions] == [("latency", True)]


def test_normalization_cancels_a_slower_machine() -> None:
    base, cand = frame(campaign(0)), frame(campaign(1, machine=3.0))
    assert compare.compare_frames(base, cand).regressions  # raw: everything looks 3x slower
    assert compare.compare_frames(base, cand, normalize_by="sdpa").regressions == []


def test_added_removed_and_status_changes() -> None:
    base, cand = campaign(0), campaign(1)
    cand = [r for r in cand if not (r["method"] == "linear" and r["kv_len"] == 512)]  # 2 removed
    cand.append(make_row("new", method="new_method", impl="reference", kv_len=512, seq_len=512))
    failed = next(r for r in cand if r["method"] == "sliding_window")
    failed.update(status="oom", reason="out of memory", latency_ms=None, latency_samples_ms=None)
    result = compare.compare_frames(frame(base), frame(cand), normalize_by="sdpa")
    assert len(result.removed) == 2 and all(r.startswith("linear/reference") for r in result.removed)
    assert len(result.added) == 1 and result.added[0].startswith("new_method/reference")
    status = [r for r in result.regressions if r.kind == "status"]
    assert len(status) == 1 and "ok -> oom: out of memory" in status[0].detail
    md = compare.to_markdown(result)
    assert "### Removed cells (2)" in md and "### Added cells (1)" in md and "Regression" in md


def test_accuracy_drop_and_fidelity_growth() -> None:
    """Judged as each row's declarations say: accuracy by its drop, fidelity error by its growth."""
    declared = json.dumps([{"name": "accuracy", "better": "higher", "judge": "drop"},
                           {"name": "fidelity_rel", "better": "lower", "judge": "growth"}])  # fmt: skip
    base, cand = campaign(0), campaign(1)
    for r in base + cand:
        r["metrics"] = declared
    for r in cand:
        if r["method"] == "linear" and r["kv_len"] == 1024:
            r["accuracy"] = 0.8  # -0.1, beyond the 0.02 tolerance
        if r["method"] == "sliding_window" and r["kv_len"] == 2048:
            r["fidelity_rel"] = 5e-3  # 5x the error
        if r["method"] == "softmax" and r["kv_len"] == 512:
            r["fidelity_rel"] = 1.2e-3  # +20%: within tolerance
            r["accuracy"] = 0.89  # -0.01: within tolerance
    result = compare.compare_frames(frame(base), frame(cand), normalize_by="sdpa")
    kinds = sorted((r.kind, r.cell.split(" ")[0]) for r in result.regressions)
    assert kinds == [("accuracy", "linear/reference")] * 2 + [("fidelity_rel", "sliding_window/reference")] * 2


def test_ratio_ci_brackets_a_known_shift() -> None:
    rng = np.random.default_rng(0)
    base, cand = rng.lognormal(0, 0.05, 30), 2 * rng.lognormal(0, 0.05, 30)
    ratio, lo, hi = compare.ratio_ci(base, cand)
    assert 1.85 < lo < ratio < hi < 2.15
    assert compare.ratio_ci(base, cand) == (ratio, lo, hi)  # fixed seed: reproducible verdicts


def write(folder: Path, rows: list[dict]) -> Path:
    for r in rows:
        write_row(folder, r)
    return folder


def test_cli_exit_codes_and_json(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    base = write(tmp_path / "base", campaign(0))
    same = write(tmp_path / "same", campaign(1))
    slow = write(tmp_path / "slow", campaign(1, {"linear/reference": 2.0}))
    verdict = tmp_path / "v.json"
    assert compare.main([str(base), str(same), "--normalize-by", "sdpa", "--json", str(verdict)]) == 0
    assert json.loads(verdict.read_text())["verdict"] == "ok"
    assert "No regression" in capsys.readouterr().out
    assert compare.main([str(base), str(slow), "--normalize-by", "sdpa", "--json", "-"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["verdict"] == "regression" and out["regressions"][0]["cell"].startswith("linear/reference")


def test_bad_input_exits_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    base = write(tmp_path / "base", campaign(0)[:4])
    corrupt = write(tmp_path / "corrupt", campaign(1)[:4])
    (corrupt / "broken.parquet").write_bytes(b"not parquet")
    (tmp_path / "empty").mkdir()
    other = write(tmp_path / "other", [make_row("x", task="needle", method="zzz")])
    for cand in (corrupt, tmp_path / "empty", tmp_path / "missing", other):
        assert compare.main([str(base), str(cand)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err
    assert compare.main([str(base), str(corrupt)]) == 2 and "broken.parquet" in capsys.readouterr().err


def test_keys_include_task_keys_not_metrics() -> None:
    """Rows without declarations (schema 1) get their task's registered keys; metrics never become keys."""
    rows = [make_row("a", task="needle", depth=0.5, variant="single", hits=3, trials=4, margin=0.1)]
    keys = key_columns(frame(rows))
    assert {"depth", "variant", "beta", "method_params", "seq_len", "causal"} <= set(keys)
    assert not {"hits", "trials", "margin", "input_dist", "hardware", "run_id", "cell_id", "threads"} & set(keys)


def test_declared_keys_and_metrics_of_an_unknown_task_are_honoured() -> None:
    """A task the code does not know is still matched and judged by what its rows declare."""
    declared = dict(task="unregistered", keys=["seq_len", "knob"],
                    metrics=json.dumps([{"name": "score", "better": "higher", "judge": "drop"}]))  # fmt: skip
    base = [make_row(f"b{k}", knob=k, score=0.9, **declared) for k in (1, 2)]
    cand = [make_row("c1", knob=1, score=0.9, **declared), make_row("c2", knob=2, score=0.5, **declared)]
    result = compare.compare_frames(frame(base), frame(cand))
    assert result.matched == 2  # `knob` tells the two cells apart
    assert [(r.kind, "knob=2" in r.cell) for r in result.regressions] == [("score", True)]


def test_normalize_by_names_its_yardstick_from_the_rows() -> None:
    """A bare IMPL is the exact method that has it; METHOD/IMPL names any row; an unknown one is bad input."""
    base, cand = frame(campaign(0)), frame(campaign(1, {"linear/reference": 2.0}))
    bare = compare.compare_frames(base, cand, normalize_by="sdpa")
    assert bare.normalize_by == "softmax/sdpa"
    full = compare.compare_frames(base, cand, normalize_by="softmax/sdpa")
    assert [f.ratio for f in full.findings] == [f.ratio for f in bare.findings]
    other = compare.compare_frames(base, cand, normalize_by="linear/reference")  # linear is the yardstick now
    assert not [f for f in other.regressions if f.cell.startswith("linear/reference")]
    with pytest.raises(compare.BadInput, match="--normalize-by flash: needs exactly one exact method"):
        compare.compare_frames(base, cand, normalize_by="flash")


# ---------------------------------------------------------------- disturbed rows (issue 14)


def disturb(row: dict, slowdown: float = 3.1) -> dict:
    """The row as the runner writes it when the interference probe stayed disturbed: flagged, slowdown kept."""
    row.update(noisy=True, probe_slowdown=slowdown, latency_cv=0.4)
    return row


def slow_cells(rows: list[dict], method: str, factor: float, where=lambda r: True) -> list[dict]:
    """The rows of `method` matching `where`, their samples `factor` times slower (returned for flagging)."""
    hit = [r for r in rows if r["method"] == method and where(r)]
    for r in hit:
        r["latency_samples_ms"] = [x * factor for x in r["latency_samples_ms"]]
        r["latency_ms"] = float(np.median(r["latency_samples_ms"]))
    return hit


def latency_of(result: compare.Comparison, method: str, kv: int, causal: bool) -> compare.Finding:
    pattern = " causal " if causal else " non-causal "
    return next(f for f in result.findings if f.kind == "latency" and f.cell.startswith(f"{method}/")
                and pattern in f" {f.cell} " and f" q={kv} " in f" {f.cell} ")  # fmt: skip


def test_a_disturbed_slow_cell_is_not_judged_and_the_same_cell_undisturbed_is() -> None:
    base, cand = campaign(0), campaign(1)
    victim = slow_cells(cand, "linear", 5.0, lambda r: r["kv_len"] == 4096 and r["causal"])
    clean = compare.compare_frames(frame(base), frame(cand), normalize_by="sdpa")
    assert [(r.kind, "kv=4096" in r.cell) for r in clean.regressions] == [("latency", True)]
    disturb(victim[0])
    noisy = compare.compare_frames(frame(base), frame(cand), normalize_by="sdpa")
    assert noisy.regressions == []
    finding = latency_of(noisy, "linear", 4096, True)
    assert finding.verdict == "unjudged" and finding.ratio is None and finding.ci is None
    assert finding.detail.startswith("not judged: disturbed (candidate probe 3.1x slower than idle); as measured: ")
    assert [f.cell for f in noisy.disturbed] == [finding.cell]
    md = compare.to_markdown(noisy)
    assert "### Not judged: disturbed (1)" in md and "1 cell(s) not judged: disturbed" in md.splitlines()[2]
    verdict = noisy.to_json()
    assert verdict["exit_code"] == 0 and verdict["n_disturbed"] == 1 and verdict["disturbed"][0]["cell"] == finding.cell


def test_disturbed_cells_do_not_count_toward_the_method_verdict() -> None:
    """linear 2x slower in all 8 cells: a method regression (no cell alone passes 3x). With 5 of them flagged
    noisy the method is judged on the other 3; with 6 flagged, 2 cells are too few for a method verdict."""
    base, cand = campaign(0), campaign(1)
    hit = slow_cells(cand, "linear", 2.0)
    clean = compare.compare_frames(frame(base), frame(cand), normalize_by="sdpa")
    assert [r.cell for r in clean.regressions] == ["linear/reference (all judged cells)"]
    assert "over 8 cells" in clean.regressions[0].detail
    for r in hit[:5]:
        disturb(r)
    five = compare.compare_frames(frame(base), frame(cand), normalize_by="sdpa")
    assert len(five.disturbed) == 5 and "over 3 cells" in five.regressions[0].detail
    disturb(hit[5])
    six = compare.compare_frames(frame(base), frame(cand), normalize_by="sdpa")
    assert six.regressions == [] and len(six.disturbed) == 6
    assert not [f for f in six.findings if f.cell == "linear/reference (all judged cells)"]
    assert six.to_json()["exit_code"] == 0


def test_a_disturbed_yardstick_leaves_its_shape_unjudged() -> None:
    """sdpa's candidate row at one shape ran 3x fast-looking under a burst elsewhere in its run: every cell divided
    by it looks 3x slower; flagged noisy, those cells are not judged."""
    base, cand = campaign(0), campaign(1)
    ref = slow_cells(cand, "softmax", 1 / 4, lambda r: r["impl"] == "sdpa" and r["kv_len"] == 2048 and r["causal"])
    clean = compare.compare_frames(frame(base), frame(cand), normalize_by="sdpa")
    assert sorted(r.cell.split(" ")[0] for r in clean.regressions if r.kind == "latency") == [
        "linear/reference", "sliding_window/reference", "softmax/reference"]  # fmt: skip
    disturb(ref[0], slowdown=2.5)
    noisy = compare.compare_frames(frame(base), frame(cand), normalize_by="sdpa")
    assert [r for r in noisy.regressions if r.kind == "latency"] == []
    details = {f.cell.split(" ")[0]: f.detail for f in noisy.disturbed}
    assert sorted(details) == ["linear/reference", "sliding_window/reference", "softmax/reference"]
    assert all(d.startswith("not judged: disturbed yardstick (softmax/sdpa candidate probe 2.5x slower than idle)")
               for d in details.values())  # fmt: skip
    raw = compare.compare_frames(frame(base), frame(cand))  # not normalized: the yardstick plays no part
    assert all(f.cell.startswith("softmax/sdpa") for f in raw.disturbed)


def test_accuracy_and_status_are_still_judged_on_a_disturbed_row() -> None:
    declared = json.dumps([{"name": "accuracy", "better": "higher", "judge": "drop"}])
    base, cand = campaign(0), campaign(1)
    for r in base + cand:
        r["metrics"] = declared
    victim = next(r for r in cand if r["method"] == "linear" and r["kv_len"] == 1024 and r["causal"])
    disturb(victim)["accuracy"] = 0.5
    failed = disturb(next(r for r in cand if r["method"] == "sliding_window" and r["kv_len"] == 512))
    failed.update(status="error", reason="boom", latency_ms=None, latency_samples_ms=None)
    result = compare.compare_frames(frame(base), frame(cand), normalize_by="sdpa")
    assert sorted((r.kind, r.cell.split(" ")[0]) for r in result.regressions) == [
        ("accuracy", "linear/reference"), ("status", "sliding_window/reference")]  # fmt: skip
    assert latency_of(result, "linear", 1024, True).detail.startswith("not judged: disturbed")


def test_throttled_counts_as_disturbed_and_names_itself() -> None:
    base, cand = campaign(0), campaign(1)
    row = next(r for r in base if r["method"] == "linear" and r["kv_len"] == 512 and not r["causal"])
    row["throttled"] = True
    result = compare.compare_frames(frame(base), frame(cand))
    assert [f.detail.split(";")[0] for f in result.disturbed] == ["not judged: disturbed (base GPU clocks throttled)"]


@pytest.mark.parametrize("missing", [None, float("nan"), False, pd.NA])
def test_rows_without_a_probe_reading_compare_exactly_as_before(missing: object) -> None:
    """Rows written before the probe lack the columns; None, NaN, NA and False mean 'not disturbed' alike."""
    base, cand = campaign(0), campaign(1, {"linear/reference": 2.0})
    before = compare.compare_frames(frame(base), frame(cand), normalize_by="sdpa")
    for r in base + cand:
        r.update(noisy=missing, throttled=missing, probe_slowdown=None if missing is False else missing)
    after = compare.compare_frames(frame(base), frame(cand), normalize_by="sdpa")
    assert [asdict(f) for f in after.findings] == [asdict(f) for f in before.findings]
    assert after.disturbed == [] and [r.cell for r in after.regressions] == ["linear/reference (all judged cells)"]


def test_cli_exits_0_with_disturbed_cells_and_lists_them(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cand_rows = campaign(1)
    for r in slow_cells(cand_rows, "linear", 5.0):
        disturb(r)
    base, cand = write(tmp_path / "base", campaign(0)), write(tmp_path / "cand", cand_rows)
    assert compare.main([str(base), str(cand), "--normalize-by", "sdpa", "--json", "-"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["verdict"] == "ok" and out["n_disturbed"] == 8 == len(out["disturbed"])
    assert compare.main([str(base), str(cand), "--normalize-by", "sdpa"]) == 0
    assert "### Not judged: disturbed (8)" in capsys.readouterr().out


# ---------------------------------------------------------------- machines (issue 14)

ZEN5 = "AuthenticAMD family 26 model 2 stepping 1, 2 cpus"
ZEN3 = "AuthenticAMD family 25 model 1 stepping 1, 2 cpus"


def on(rows: list[dict], machine: str | None) -> list[dict]:
    for r in rows:
        r.update(device="cpu: AMD EPYC", machine=machine)
    return rows


def test_same_machine_leaves_latency_on_another_machine_unjudged_and_judges_the_rest() -> None:
    """A baseline from another VM type (same masked model name) with linear 2x off: by default a regression and a
    warning; with --same-machine latency is not judged there, while accuracy and status still are."""
    declared = json.dumps([{"name": "accuracy", "better": "higher", "judge": "drop"}])
    base = on(campaign(0), ZEN3)
    cand = on(campaign(1, {"linear/reference": 2.0}), ZEN5)
    for r in base + cand:
        r["metrics"] = declared
    next(r for r in cand if r["method"] == "softmax" and r["impl"] == "reference")["accuracy"] = 0.5
    default = compare.compare_frames(frame(base), frame(cand), normalize_by="sdpa")
    assert "linear/reference (all judged cells)" in [r.cell for r in default.regressions]
    assert default.machines_differ and default.other_machine == []
    md = compare.to_markdown(default)
    assert f"measured on different machines: base cpu: AMD EPYC; {ZEN3}; candidate cpu: AMD EPYC; {ZEN5}" in md
    assert "pass --same-machine" in md
    strict = compare.compare_frames(frame(base), frame(cand), normalize_by="sdpa", same_machine=True)
    assert [(r.kind, r.cell.split(" ")[0]) for r in strict.regressions] == [("accuracy", "softmax/reference")]
    judged_before = [f for f in default.findings if f.kind == "latency" and f.verdict != "unjudged"]
    assert len(strict.other_machine) == len(judged_before) > 0
    assert all(f.ratio is None and f.detail.startswith(f"not judged: other machine (base cpu: AMD EPYC; {ZEN3}")
               for f in strict.other_machine)  # fmt: skip
    assert not [f for f in strict.findings if f.kind == "latency (method)"]
    verdict = strict.to_json()
    assert verdict["machines"] == {"base": [f"cpu: AMD EPYC; {ZEN3}"], "candidate": [f"cpu: AMD EPYC; {ZEN5}"]}
    assert verdict["n_other_machine"] == len(strict.other_machine)
    md = compare.to_markdown(strict)
    assert "latency not judged (--same-machine)" in md and "cell(s) not judged: other machine" in md.splitlines()[2]


def test_same_machine_judges_rows_of_one_machine_and_rows_that_name_none() -> None:
    slower = {"linear/reference": 2.0}
    for base_machine, cand_machine in ((ZEN5, ZEN5), (None, ZEN5), (None, None)):
        base, cand = on(campaign(0), base_machine), on(campaign(1, slower), cand_machine)
        result = compare.compare_frames(frame(base), frame(cand), normalize_by="sdpa", same_machine=True)
        assert [r.cell for r in result.regressions] == ["linear/reference (all judged cells)"]
        assert result.other_machine == [] and not result.machines_differ
        assert "different machines" not in compare.to_markdown(result)


def test_cli_same_machine_flag(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    base = write(tmp_path / "base", on(campaign(0), ZEN3))
    cand = write(tmp_path / "cand", on(campaign(1, {"linear/reference": 2.0}), ZEN5))
    assert compare.main([str(base), str(cand), "--normalize-by", "sdpa"]) == 1
    capsys.readouterr()
    assert compare.main([str(base), str(cand), "--normalize-by", "sdpa", "--same-machine", "--json", "-"]) == 0
    assert json.loads(capsys.readouterr().out)["n_other_machine"] > 0


def test_rows_name_their_host_cpu() -> None:
    from bench.measure.provenance import cpu_arch, provenance

    assert provenance()["machine"] == cpu_arch()
    if Path("/proc/cpuinfo").is_file():
        arch = cpu_arch()
        assert arch is not None and arch.endswith(" cpus") and len(arch) > len(" cpus")
