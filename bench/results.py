"""The results store: one Parquet file per cell, written atomically, with a versioned schema.

One file per cell means a crash or a kill never loses finished cells, a
re-run can skip cells by looking for their file, and runs from several
machines merge by copying folders together.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.compute  # noqa: F401 - pa.compute
import pyarrow.parquet as pq

from bench.measure.files import atomic_write

SCHEMA_VERSION = 2  # 2: rows name their key columns (`keys`) and declare their metrics (`metrics`)
STATUSES = ("ok", "unsupported", "oom", "error", "wrong", "timeout")

# The core columns every row has, in order, with their Arrow types. Tasks may add columns.
CORE_SCHEMA = pa.schema(
    [
        ("schema_version", pa.int32()),
        ("run_id", pa.string()),
        ("cell_id", pa.string()),
        ("method", pa.string()),
        ("impl", pa.string()),
        ("family", pa.string()),
        ("task", pa.string()),
        ("suite", pa.string()),
        ("hardware", pa.string()),
        ("device", pa.string()),
        ("dtype", pa.string()),
        ("batch", pa.int64()),
        ("heads", pa.int64()),
        ("seq_len", pa.int64()),
        ("kv_len", pa.int64()),
        ("head_dim", pa.int64()),
        ("causal", pa.bool_()),
        ("mode", pa.string()),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("latency_ms", pa.float64()),
        ("latency_ms_p10", pa.float64()),
        ("latency_ms_p90", pa.float64()),
        ("latency_samples_ms", pa.list_(pa.float64())),
        ("peak_mem_bytes", pa.int64()),
        ("flops", pa.int64()),
        ("tflops", pa.float64()),
        ("pct_peak", pa.float64()),
        ("fidelity_max_abs", pa.float64()),
        ("fidelity_rel", pa.float64()),
        ("accuracy", pa.float64()),
        ("git_commit", pa.string()),
        ("git_dirty", pa.bool_()),
        ("torch_version", pa.string()),
        ("triton_version", pa.string()),
        ("python_version", pa.string()),
        ("seed", pa.int64()),
        ("config_yaml", pa.string()),
        ("timestamp", pa.string()),
        ("keys", pa.list_(pa.string())),  # the columns that identify the cell besides method, impl and task
        ("metrics", pa.string()),  # JSON list of the task's metric declarations (name, unit, better, judge, headline)
    ]
)
CORE_COLUMNS = tuple(CORE_SCHEMA.names)


class CorruptResults(ValueError):
    """A results file that cannot be read, or a schema newer than this code understands."""


def _table_for(row: dict) -> pa.Table:
    """Core columns get their declared types (None allowed); task columns are inferred."""
    missing = [c for c in CORE_COLUMNS if c not in row]
    if missing:
        raise ValueError(f"row is missing core columns: {', '.join(missing)}")
    if row["status"] not in STATUSES:
        raise ValueError(f"status {row['status']!r} is not one of: {', '.join(STATUSES)}")
    fields, arrays = [], []
    for f in CORE_SCHEMA:
        fields.append(f)
        arrays.append(pa.array([row[f.name]], type=f.type))
    for name in sorted(set(row) - set(CORE_COLUMNS)):
        value = row[name]
        if isinstance(value, dict):
            value = json.dumps(value, sort_keys=True)
        arr = pa.array([value])
        fields.append(pa.field(name, arr.type))
        arrays.append(arr)
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields, metadata={"attnbench_schema": str(SCHEMA_VERSION)}))


def cell_path(results_dir: Path | str, cell_id: str) -> Path:
    return Path(results_dir) / f"{cell_id}.parquet"


def write_row(results_dir: Path | str, row: dict) -> Path:
    """Write one cell's row atomically: a temp file in the same folder, then rename over the old one."""
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    table = _table_for({**row, "schema_version": SCHEMA_VERSION})
    final = cell_path(results_dir, row["cell_id"])
    atomic_write(final, lambda tmp: pq.write_table(table, tmp))
    return final


def read_table(path: Path | str) -> pa.Table:
    """One results file as an Arrow table; `CorruptResults` names the file when it cannot be read."""
    try:
        table = pq.ParquetFile(path).read(use_threads=False)  # tiny files: a thread pool costs more than it saves
    except Exception as err:
        raise CorruptResults(f"corrupt results file {path}: {type(err).__name__}: {err}".splitlines()[0]) from err
    if "schema_version" not in table.column_names or table.num_rows == 0:
        raise CorruptResults(f"corrupt results file {path}: no rows or no schema_version column")
    newest = pa.compute.max(table["schema_version"]).as_py()
    if newest is None or newest > SCHEMA_VERSION:
        raise CorruptResults(
            f"results file {path} has schema {newest}, newer than this attnbench ({SCHEMA_VERSION}); update attnbench"
        )
    return table


def read_file(path: Path | str) -> pd.DataFrame:
    return read_table(path).to_pandas()


def read_row(path: Path | str) -> dict:
    """One cell's row as plain Python values (nulls as None, lists as lists): edit it and `write_row` it back."""
    return read_table(path).to_pylist()[0]


def result_files(path: Path | str) -> list[Path]:
    """Every row file under `path` (recursively), skipping temp files and report folders."""
    path = Path(path)
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*.parquet") if not p.name.startswith(".") and "report" not in p.parts)


def load(path: Path | str, on_corrupt: str = "raise") -> pd.DataFrame:
    """Every row under a folder (or one file) as one DataFrame.

    `on_corrupt='raise'` stops at the first unreadable file; `'warn'` skips it
    with a warning, so one bad file does not hide every other result.
    """
    if on_corrupt not in ("raise", "warn"):
        raise ValueError(f"on_corrupt must be 'raise' or 'warn', not {on_corrupt!r}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no results at {path}")
    tables = []
    for file in result_files(path):
        try:
            tables.append(read_table(file))
        except CorruptResults as err:
            if on_corrupt == "raise":
                raise
            warnings.warn(str(err), stacklevel=2)
    if not tables:
        return pd.DataFrame(columns=list(CORE_COLUMNS))
    # One Arrow concat and one conversion: per-file pandas frames make 10k-row loads take a minute.
    # Task columns missing from some files become nulls; all-null columns get their type from the others.
    tables = [t.replace_schema_metadata(None) for t in tables]
    try:
        df = pa.concat_tables(tables, promote_options="permissive").to_pandas()
    except (pa.ArrowInvalid, pa.ArrowTypeError):  # a task column with clashing types across files
        df = pd.concat([t.to_pandas() for t in tables], ignore_index=True, sort=False)
    for col in CORE_COLUMNS:
        if col not in df.columns:
            df[col] = None
    return df


def finished_cells(results_dir: Path | str) -> set[str]:
    """cell_ids that already have an `ok` row: a re-run skips them. Unreadable files count as not finished."""
    done = set()
    for file in result_files(results_dir):
        try:
            table = pq.read_table(file, columns=["cell_id", "status"])
        except Exception:
            continue
        for cell_id, status in zip(table["cell_id"].to_pylist(), table["status"].to_pylist(), strict=False):
            if status == "ok":
                done.add(cell_id)
    return done
