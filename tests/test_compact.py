"""Compaction of results folders: one file per folder, read as the loose files were, safe beside writers and crashes."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import bench.results as results
from bench.report.rows import load_results
from bench.results import (
    COMPACTED_MARK,
    COMPACTED_NAME,
    CORE_COLUMNS,
    SCHEMA_VERSION,
    CorruptResults,
    compact,
    finished_cells,
    load,
    read_rows,
    write_compacted,
    write_row,
)

REPO = Path(__file__).resolve().parent.parent


def row(cell_id: str, status: str = "ok", **extra) -> dict:
    r = dict.fromkeys(CORE_COLUMNS)
    r.update(cell_id=cell_id, status=status, reason="" if status == "ok" else f"{status}: x", method="softmax",
             impl="reference", task="scaling", seq_len=128, kv_len=128, causal=True, latency_ms=1.5,
             latency_samples_ms=[1.0, 1.5, 2.0], keys=["seq_len", "kv_len"], metrics='[{"name": "latency_ms"}]')  # fmt: skip
    r.update(extra)
    return r


def mixed_rows() -> list[dict]:
    """Rows as a campaign has them: task columns some rows lack, nulls, lists, bools, failures."""
    return [
        row("b-scaling", interpreted=False, method_params="{}"),
        row("a-needle", task="needle", depth=0.25, variant="single", hits=12, trials=16, accuracy=0.75),
        row("c-oom", status="oom", latency_ms=None, latency_samples_ms=None, interpreted=True),
        row("d-params", method_params={"window": 64}, peak_mem_bytes=2**30, git_dirty=True),
    ]


def loose_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.parquet") if p.name != COMPACTED_NAME)


# ---------------------------------------------------------------- round trip, CLI, nesting


def test_compaction_reads_back_exactly_what_the_loose_files_held(tmp_path: Path) -> None:
    for r in mixed_rows():
        write_row(tmp_path, r)
    # A schema-1 row (no keys, no metrics) keeps its own schema_version through compaction.
    old = {k: v for k, v in row("e-old", schema_version=1).items() if k not in ("keys", "metrics")}
    pq.write_table(pa.Table.from_pylist([old]), tmp_path / "e-old.parquet")
    before = load(tmp_path)
    done = compact(tmp_path)
    assert (done.folders, done.rows, done.merged, done.unreadable) == (1, 5, 5, [])
    assert loose_files(tmp_path) == [] and (tmp_path / COMPACTED_NAME).exists()
    assert pq.read_metadata(tmp_path / COMPACTED_NAME).metadata[COMPACTED_MARK] == b"1"
    after = load(tmp_path)
    pd.testing.assert_frame_equal(after, before)  # same rows, order, values and dtypes
    assert after.set_index("cell_id")["schema_version"].to_dict() == {
        "a-needle": SCHEMA_VERSION, "b-scaling": SCHEMA_VERSION, "c-oom": SCHEMA_VERSION,
        "d-params": SCHEMA_VERSION, "e-old": 1}  # fmt: skip
    assert after["latency_samples_ms"].map(lambda v: v is not None and list(v) == [1.0, 1.5, 2.0]).sum() == 4
    assert str(after["hits"].dtype) == "float64" and after["latency_ms"].dtype == "float64"
    assert read_rows(tmp_path)[3]["method_params"] == '{"window": 64}'  # dicts stored as JSON, as write_row does
    assert compact(tmp_path).folders == 0  # nothing loose: the compacted file is not rewritten


def test_the_cli_compacts_each_nested_folder_on_its_own(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for run, latency in (("run1", 1.0), ("run2", 2.0)):  # the same cell in two runs: two measurements
        write_row(tmp_path / "runs" / run, row("same", latency_ms=latency))
        write_row(tmp_path / "runs" / run, row(f"only-{run}"))
    write_row(tmp_path / "runs" / "run2" / "report", row("ignored"))  # report folders hold no results
    assert results.main(["compact", str(tmp_path)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out == [f"compacted {tmp_path}: 4 loose files merged and removed, 4 rows in 2 {COMPACTED_NAME} files"]
    for run, latency in (("run1", 1.0), ("run2", 2.0)):
        folder = tmp_path / "runs" / run
        assert loose_files(folder) == []
        assert load(folder).set_index("cell_id")["latency_ms"].to_dict() == {"same": latency, f"only-{run}": 1.5}
    assert len(load(tmp_path)) == 4
    assert results.main(["compact", str(tmp_path / "nope")]) == 2
    assert "no results folder" in capsys.readouterr().err


def test_write_compacted_merges_with_what_is_there_and_wins(tmp_path: Path) -> None:
    write_row(tmp_path, row("a", latency_ms=1.0))
    write_row(tmp_path, row("b", latency_ms=1.0))
    write_compacted(tmp_path, [row("b", latency_ms=2.0), row("c", latency_ms=2.0)])
    assert loose_files(tmp_path) == []
    assert load(tmp_path).set_index("cell_id")["latency_ms"].to_dict() == {"a": 1.0, "b": 2.0, "c": 2.0}
    with pytest.raises(ValueError, match="compacted file's name"):
        write_row(tmp_path, row("_compacted"))


# ---------------------------------------------------------------- loose wins, finished cells


def test_a_loose_row_written_after_compaction_wins_and_is_merged_next_time(tmp_path: Path) -> None:
    write_row(tmp_path, row("a", status="ok"))
    write_row(tmp_path, row("b", status="ok"))
    compact(tmp_path)
    assert finished_cells(tmp_path) == {"a", "b"}  # a re-run skips compacted ok cells
    write_row(tmp_path, row("b", status="error", latency_ms=None))  # a forced re-run failed this time
    write_row(tmp_path, row("c", status="ok"))
    df = load(tmp_path)
    assert df["cell_id"].tolist() == ["a", "b", "c"]  # each cell once, in cell order
    assert df.set_index("cell_id")["status"].to_dict() == {"a": "ok", "b": "error", "c": "ok"}
    assert finished_cells(tmp_path) == {"a", "c"}  # b's newer (loose) row is not ok
    done = compact(tmp_path)
    assert (done.rows, done.merged) == (3, 2) and loose_files(tmp_path) == []
    pd.testing.assert_frame_equal(load(tmp_path), df)


# ---------------------------------------------------------------- corrupt files


def test_a_corrupt_compacted_file_is_named_skipped_with_warn_and_never_overwritten(tmp_path: Path) -> None:
    write_row(tmp_path, row("a"))
    compact(tmp_path)
    (tmp_path / COMPACTED_NAME).write_bytes(b"PAR1 not really")
    write_row(tmp_path, row("b"))
    with pytest.raises(CorruptResults, match=rf"corrupt results file .*{COMPACTED_NAME}: "):
        load(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        df = load(tmp_path, on_corrupt="warn")
    assert df["cell_id"].tolist() == ["b"]
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and COMPACTED_NAME in messages[0] and "\n" not in messages[0]
    assert finished_cells(tmp_path) == {"b"}
    _, corrupt = load_results(tmp_path)  # the report lists it under Not measured
    assert [file for file, _ in corrupt] == [COMPACTED_NAME]
    with pytest.raises(CorruptResults, match=COMPACTED_NAME):
        compact(tmp_path)  # its rows cannot be read, so they must not be replaced
    assert loose_files(tmp_path) == ["b.parquet"] and (tmp_path / COMPACTED_NAME).read_bytes() == b"PAR1 not really"


def test_a_compacted_file_of_a_newer_schema_is_refused(tmp_path: Path) -> None:
    write_compacted(tmp_path, [row("a")])
    table = pq.read_table(tmp_path / COMPACTED_NAME)
    newer = table.set_column(0, "schema_version", pa.array([SCHEMA_VERSION + 1], pa.int32()))
    pq.write_table(newer, tmp_path / COMPACTED_NAME)
    with pytest.raises(CorruptResults, match="newer than this attnbench"):
        load(tmp_path)


def test_unreadable_loose_files_are_left_as_they_are(tmp_path: Path) -> None:
    write_row(tmp_path, row("a"))
    (tmp_path / "bad.parquet").write_bytes(b"garbage")
    done = compact(tmp_path)
    assert done.merged == 1 and done.unreadable == [tmp_path / "bad.parquet"]
    assert loose_files(tmp_path) == ["bad.parquet"]
    with pytest.warns(UserWarning, match="bad.parquet"):
        assert load(tmp_path, on_corrupt="warn")["cell_id"].tolist() == ["a"]


# ---------------------------------------------------------------- crashes


def test_a_compaction_that_dies_before_or_while_removing_loose_files_leaves_each_row_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The compacted file is in place, some or none of the loose files are gone: loose wins, nothing doubles."""
    for i in range(6):
        write_row(tmp_path, row(f"c{i}", latency_ms=float(i)))
    expected = load(tmp_path)
    real = results._remove_merged

    for removed in (0, 3):  # killed right after the rename; killed half-way through the removals
        def crash(files: list[Path], n: int = removed) -> None:
            real(files[:n])
            raise KeyboardInterrupt("killed")

        monkeypatch.setattr(results, "_remove_merged", crash)
        with pytest.raises(KeyboardInterrupt):
            compact(tmp_path)
        assert len(loose_files(tmp_path)) == 6 - removed
        pd.testing.assert_frame_equal(load(tmp_path), expected)
        assert finished_cells(tmp_path) == set(expected["cell_id"])
        monkeypatch.setattr(results, "_remove_merged", real)
        write_row(tmp_path, row("c0", latency_ms=0.0))  # rewrite one cell: the next round starts with it loose
    # A writer or compaction killed mid-write leaves a temp file: ignored by readers, swept by the next compaction.
    (tmp_path / f".{COMPACTED_NAME}.x1y2.tmp").write_bytes(b"half a file")
    pd.testing.assert_frame_equal(load(tmp_path), expected)
    assert compact(tmp_path).rows == 6 and loose_files(tmp_path) == [] and not list(tmp_path.glob(".*.tmp"))
    pd.testing.assert_frame_equal(load(tmp_path), expected)


def python(code: str, *args: str, **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], cwd=REPO, env=env, text=True,
                            **popen)  # fmt: skip


def test_kill_9_of_a_compaction_at_a_random_moment_loses_and_doubles_nothing(tmp_path: Path) -> None:
    rows = [row(f"c{i:03d}", latency_ms=float(i)) for i in range(150)]
    for r in rows:  # how long one compaction of these files takes here: the window to kill in
        write_row(tmp_path / "timing", r)
    began = time.perf_counter()
    compact(tmp_path / "timing")
    window = time.perf_counter() - began
    folder = tmp_path / "run"
    rng = random.Random(15)
    killed_inside = 0
    for _ in range(3):
        for r in rows:  # the sweep ran again: every cell loose once more, so each compaction is a full one
            write_row(folder, r)
        expected = load(folder)
        child = python("""
            import sys
            from bench.results import compact
            print("go", flush=True)
            compact(sys.argv[1])
            print("done", flush=True)
        """, str(folder), stdout=subprocess.PIPE)  # fmt: skip
        assert child.stdout.readline().strip() == "go"
        time.sleep(rng.uniform(0.0, window))
        child.send_signal(signal.SIGKILL)
        killed_inside += child.stdout.read().strip() != "done"
        child.wait()
        pd.testing.assert_frame_equal(load(folder), expected)
        assert finished_cells(folder) == set(expected["cell_id"])
    compact(folder)  # finishes what the last kill interrupted, if it did
    assert loose_files(folder) == []
    pd.testing.assert_frame_equal(load(folder), expected)
    assert killed_inside >= 1, "every compaction finished before the kill: nothing was tested"


# ---------------------------------------------------------------- concurrency


WRITER = """
    import sys, time
    from pathlib import Path
    from bench.results import CORE_COLUMNS, write_row
    folder, name, start = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    while not start.exists():
        time.sleep(0.01)
    def row(k, version):
        r = dict.fromkeys(CORE_COLUMNS)
        r.update(cell_id=f"{name}-{k:02d}", status="ok", method="m", impl="i", latency_ms=float(version))
        return r
    for k in range(50):  # every cell written twice: a compaction must never remove a newer file than it read
        write_row(folder, row(k, 1))
        if k:
            write_row(folder, row(k - 1, 2))
    write_row(folder, row(49, 2))
"""
COMPACTOR = """
    import sys
    from pathlib import Path
    from bench.results import compact
    folder, stop = Path(sys.argv[1]), Path(sys.argv[2])
    print("ready", flush=True)
    n = 0
    while not stop.exists():
        n += compact(folder).folders if any(folder.glob("*.parquet")) else 0
    print(n, flush=True)
"""


def test_four_writers_and_a_compactor_lose_nothing(tmp_path: Path) -> None:
    folder, start, stop = tmp_path / "run", tmp_path / "start", tmp_path / "stop"
    folder.mkdir()
    compactor = python(COMPACTOR, str(folder), str(stop), stdout=subprocess.PIPE)
    writers = [python(WRITER, str(folder), f"w{i}", str(start)) for i in range(4)]
    try:
        assert compactor.stdout.readline().strip() == "ready"
        start.touch()
        seen: set[str] = set()
        while any(w.poll() is None for w in writers):  # a reader beside them: no row twice, none lost once seen
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                df = load(folder, on_corrupt="warn")
            assert df["cell_id"].is_unique
            assert seen <= set(df["cell_id"])
            seen = set(df["cell_id"])
            time.sleep(0.1)  # leave the two cores to the writers and the compactor
        assert [w.wait() for w in writers] == [0, 0, 0, 0]
        stop.touch()
        compactions = int(compactor.stdout.read().strip())
        assert compactor.wait() == 0
    finally:  # a failed assertion must not leave the compactor looping (or a writer writing) after the test
        stop.touch()
        for proc in (compactor, *writers):
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        compactor.stdout.close()
    df = load(folder)
    assert len(df) == 200 and df["cell_id"].is_unique
    assert (df["latency_ms"] == 2.0).all(), df.loc[df["latency_ms"] != 2.0, "cell_id"].tolist()  # newest kept
    assert compactions >= 2, "the compactor never ran while the writers wrote"
    compact(folder)  # whatever the compactor's last round left loose
    assert loose_files(folder) == [] and len(load(folder)) == 200
