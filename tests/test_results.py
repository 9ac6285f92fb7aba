"""The results store: atomic files, schema, loading, corrupt files."""

import warnings

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bench.results import CORE_COLUMNS, SCHEMA_VERSION, CorruptResults, finished_cells, load, write_row


def row(cell_id="c1", status="ok", **extra):
    r = dict.fromkeys(CORE_COLUMNS)
    r.update(cell_id=cell_id, status=status, reason="", method="softmax", impl="reference", seq_len=128)
    r.update(latency_samples_ms=[1.0, 2.0], latency_ms=1.5)
    r.update(extra)
    return r


def test_round_trip_keeps_core_and_task_columns(tmp_path):
    write_row(tmp_path, row("a", depth=0.5, variant="single"))
    write_row(tmp_path, row("b", status="error", reason="RuntimeError: boom"))
    df = load(tmp_path)
    assert set(CORE_COLUMNS) <= set(df.columns)
    assert len(df) == 2 and set(df.schema_version) == {SCHEMA_VERSION}
    a = df.set_index("cell_id").loc["a"]
    assert list(a.latency_samples_ms) == [1.0, 2.0] and a.depth == 0.5 and a.variant == "single"
    assert not list(tmp_path.glob(".*"))  # no temp files left behind


def test_missing_core_column_and_bad_status_are_rejected(tmp_path):
    bad = row()
    del bad["latency_ms"]
    with pytest.raises(ValueError, match="latency_ms"):
        write_row(tmp_path, bad)
    with pytest.raises(ValueError, match="not one of"):
        write_row(tmp_path, row(status="great"))
    assert not list(tmp_path.iterdir())


def test_rewrite_replaces_the_cell_file(tmp_path):
    write_row(tmp_path, row("a", status="error"))
    write_row(tmp_path, row("a", status="ok"))
    df = load(tmp_path)
    assert df.status.tolist() == ["ok"]


def test_corrupt_file_raise_or_warn_keeps_other_rows(tmp_path):
    write_row(tmp_path, row("good"))
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(CorruptResults, match="bad.parquet"):
        load(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        df = load(tmp_path, on_corrupt="warn")
    assert df.cell_id.tolist() == ["good"]
    assert any("bad.parquet" in str(w.message) for w in caught)
    assert finished_cells(tmp_path) == {"good"}


def test_newer_schema_is_refused(tmp_path):
    pq.write_table(pa.Table.from_pandas(pd.DataFrame({"schema_version": [SCHEMA_VERSION + 1]})), tmp_path / "x.parquet")
    with pytest.raises(CorruptResults, match="newer"):
        load(tmp_path)


def test_finished_cells_counts_only_ok_rows(tmp_path):
    write_row(tmp_path, row("a", status="ok"))
    write_row(tmp_path, row("b", status="error"))
    write_row(tmp_path, row("c", status="unsupported"))
    assert finished_cells(tmp_path) == {"a"}


def test_load_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no results"):
        load(tmp_path / "nope")
