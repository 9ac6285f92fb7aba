"""The results store: one Parquet file per cell, written atomically, with a versioned schema, and compaction.

One file per cell means a crash or a kill never loses finished cells, a
re-run can skip cells by looking for their file, and runs from several
machines merge by copying folders together. But reading ten thousand tiny
files takes 15-20 s, so a finished folder can be *compacted*
(`python -m bench.results compact DIR`): its loose per-cell files are merged
into one file, `_compacted.parquet` (file metadata `attnbench_compacted`; each
row keeps its own `schema_version`), and removed. A compacted file belongs to
the folder it is in: each folder under DIR is compacted on its own, because
the same cell_id in two run folders is two measurements.

Reading (`load`, `finished_cells`): per folder, the loose files, then the
compacted file; a cell_id is one row per folder, and a loose file wins over the
compacted file (a running or resumed sweep writes loose files, later than the
compaction). Rows come back in the order a folder of loose files would give
(by folder, then `<cell_id>.parquet`), compacted or not.

Concurrency, the lock: writers (`write_row`) hold a *shared* `flock` on the
folder around their atomic write (temp file, then rename), and compaction holds
an *exclusive* one from listing the loose files to removing them. So no row can
be rewritten between compaction reading a file and removing it (which would
lose the newer row), several processes write at once, and two compactions never
interleave. The lock is taken on the folder itself (a read-only descriptor of
the directory), so no lock file lies among the results; where a file system
refuses `flock` on a directory (NFS may), `.attnbench.lock` in the folder is
locked instead - every process on that file system falls back alike.
Readers take no lock (a committed or read-only folder stays readable) and stay
exact through the order they read in: loose files first, then the compacted
file. A loose file that vanished meanwhile was removed by a compaction only
after it had renamed a compacted file holding that row into place, which is the
file read next; and a compaction killed between writing the compacted file and
removing the loose ones leaves rows in both, which the loose-wins rule reads
once.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.compute  # noqa: F401 - pa.compute
import pyarrow.parquet as pq

from bench.measure.files import atomic_write

try:
    import fcntl
except ImportError:  # not POSIX: no locking (one process per folder there)
    fcntl = None  # type: ignore[assignment]

SCHEMA_VERSION = 2  # 2: rows name their key columns (`keys`) and declare their metrics (`metrics`)
STATUSES = ("ok", "unsupported", "oom", "error", "wrong", "timeout")
COMPACTED_NAME = "_compacted.parquet"  # one per folder; no cell_id may take its name
LOCK_NAME = ".attnbench.lock"  # only where the folder itself cannot be locked
COMPACTED_MARK = b"attnbench_compacted"  # file-level metadata key of a compacted file

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
_BATCH = 10_000  # rows per Arrow table built from dicts: bounds the memory of a large write_compacted


class CorruptResults(ValueError):
    """A results file that cannot be read, or a schema newer than this code understands."""


class ResultsUnwritable(OSError):
    """The results folder refused a row (read-only, disk full): the sweep stops, the rows written stay."""


def _tables_for(rows: list[dict]) -> pa.Table:
    """Rows as one table: core columns get their declared types (None allowed); task columns are inferred.

    One code path for one row (`write_row`) and many (`write_compacted`), so a row reads back the same either way.
    """
    names: dict[str, None] = {}
    for row in rows:
        missing = [c for c in CORE_COLUMNS if c not in row]
        if missing:
            raise ValueError(f"row is missing core columns: {', '.join(missing)}")
        if row["status"] not in STATUSES:
            raise ValueError(f"status {row['status']!r} is not one of: {', '.join(STATUSES)}")
        if f"{row['cell_id']}.parquet" == COMPACTED_NAME:
            raise ValueError(f"cell_id {row['cell_id']!r} is the compacted file's name")
        names.update(dict.fromkeys(row))
    fields, arrays = [], []
    for f in CORE_SCHEMA:
        fields.append(f)
        arrays.append(pa.array([row[f.name] for row in rows], type=f.type))
    for name in sorted(set(names) - set(CORE_COLUMNS)):
        values = [row.get(name) for row in rows]
        values = [json.dumps(v, sort_keys=True) if isinstance(v, dict) else v for v in values]
        try:
            arr = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
            raise ValueError(f"column {name!r} holds values of clashing types: {err}") from err
        fields.append(pa.field(name, arr.type))
        arrays.append(arr)
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields, metadata={"attnbench_schema": str(SCHEMA_VERSION)}))


def _table_for(row: dict) -> pa.Table:
    return _tables_for([row])


def cell_path(results_dir: Path | str, cell_id: str) -> Path:
    """The loose file of one cell (absent once the folder is compacted: `load` finds the row either way)."""
    return Path(results_dir) / f"{cell_id}.parquet"


@contextlib.contextmanager
def folder_lock(folder: Path | str, exclusive: bool) -> Iterator[None]:
    """Hold the folder's lock, shared (writers) or exclusive (compaction): see the module docstring for why."""
    if fcntl is None:
        yield
        return
    folder = Path(folder)
    mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, mode)
        except OSError as err:
            if err.errno not in (errno.EBADF, errno.ENOLCK, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            os.close(fd)  # a file system that cannot flock a directory: lock a file in it instead
            fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
            fcntl.flock(fd, mode)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def write_row(results_dir: Path | str, row: dict) -> Path:
    """Write one cell's row atomically: a temp file in the same folder, then rename over the old one.

    Under the folder's shared lock, so a compaction of the folder never removes a file it has not read.
    """
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    table = _table_for({**row, "schema_version": SCHEMA_VERSION})
    final = cell_path(results_dir, row["cell_id"])
    with folder_lock(results_dir, exclusive=False):
        atomic_write(final, lambda tmp: pq.write_table(table, tmp))
    return final


def write_rows(results_dir: Path | str, rows: Iterable[dict], on_write: Callable[[dict], None] = lambda row: None) -> None:
    """Write each row; a folder that refuses one (read-only, disk full) stops the sweep with one line."""
    for row in rows:
        try:
            write_row(results_dir, row)
        except OSError as err:
            raise ResultsUnwritable(f"cannot write results to {results_dir}: {err.strerror or err}; the rows written "
                                    "so far are kept: fix it and run the same command again to resume") from err  # fmt: skip
        on_write(row)


def write_compacted(results_dir: Path | str, rows: Iterable[dict]) -> Path:
    """Write many rows straight into the folder's compacted file (what is there already is kept, these rows win).

    For rows made in bulk (a baseline, synthetic campaigns): 100,000 loose files take minutes to write and to
    compact. Rows are checked and typed as `write_row` does.
    """
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    tables, batch = [], []
    for row in rows:
        batch.append({**row, "schema_version": SCHEMA_VERSION})
        if len(batch) == _BATCH:
            tables.append(_tables_for(batch))
            batch = []
    if batch:
        tables.append(_tables_for(batch))
    if not tables:
        raise ValueError("no rows to write")
    try:
        new = pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
        raise ValueError(f"rows with clashing column types: {err}") from err
    _compact_folder(results_dir, new)
    return results_dir / COMPACTED_NAME


def read_table(path: Path | str, columns: list[str] | None = None) -> pa.Table:
    """One results file as an Arrow table; `CorruptResults` names the file when it cannot be read.

    FileNotFoundError passes through: a loose file that a compaction removed is not corrupt.
    """
    path = Path(path)
    try:
        # Tiny loose files: a thread pool costs more than it saves; a compacted file is worth the threads.
        table = pq.ParquetFile(path).read(columns=columns, use_threads=path.name == COMPACTED_NAME)
    except FileNotFoundError:
        raise
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


def read_rows(path: Path | str) -> list[dict]:
    """Every row under a folder (compacted or loose, each cell once per folder) as plain Python values."""
    table = load_table(path)
    return [] if table is None else table.to_pylist()


def is_compacted(path: Path | str) -> bool:
    return Path(path).name == COMPACTED_NAME


def result_files(path: Path | str) -> list[Path]:
    """Every results file under `path` (recursively: loose and compacted), skipping temp files and report folders."""
    path = Path(path)
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*.parquet") if not p.name.startswith(".") and "report" not in p.parts)


def _folders(path: Path) -> dict[Path, list[Path]]:
    """folder -> its loose files, for every folder under `path` that holds a results file (loose or compacted)."""
    folders: dict[Path, list[Path]] = {}
    for file in result_files(path):
        loose = folders.setdefault(file.parent, [])
        if not is_compacted(file):
            loose.append(file)
    return folders


def _order_key(parts: tuple[str, ...]) -> str:
    """A text that sorts as the path does (`sorted` of Paths compares their parts); NUL is in no file name."""
    return "\0".join(parts)


LOOSE_READERS = min(4, os.cpu_count() or 1)  # more threads than cores only add switching


def _gather(path: Path, on_corrupt: str, columns: list[str] | None) -> tuple[list[pa.Table], list[pa.Array]]:
    """The tables to concatenate, each with its rows' order keys (the path a loose file of the row would have).

    Per folder: the loose files, then the compacted file without the cells a loose file holds (loose wins).
    """
    if on_corrupt not in ("raise", "warn", "skip"):
        raise ValueError(f"on_corrupt must be 'raise', 'warn' or 'skip', not {on_corrupt!r}")
    if not path.exists():
        raise FileNotFoundError(f"no results at {path}")

    def read(file: Path) -> pa.Table | None:
        try:
            return read_table(file, columns)
        except FileNotFoundError:  # compacted meanwhile: its rows are in the compacted file, read after
            return None
        except CorruptResults as err:
            if on_corrupt == "raise":
                raise
            if on_corrupt == "warn":
                warnings.warn(str(err), stacklevel=5)
            return None

    if path.is_file():
        table = read(path)
        return ([], []) if table is None else ([table], [pa.array([""] * table.num_rows, pa.string())])
    tables: list[pa.Table] = []
    keys: list[pa.Array] = []
    folders = _folders(path)
    # Loose files are read by a few threads: most of a small file's cost (opening it, parsing its footer,
    # decoding) is Arrow's C++ code, which releases the GIL; map keeps the order and re-raises in order.
    with ThreadPoolExecutor(max_workers=LOOSE_READERS) as pool:
        loose_tables = {folder: list(pool.map(read, loose)) for folder, loose in folders.items()}
    for folder, loose in folders.items():
        ids = []
        for file, table in zip(loose, loose_tables[folder], strict=True):
            if table is not None:
                tables.append(table)
                keys.append(pa.array([_order_key(file.parts)] * table.num_rows, pa.string()))
                if "cell_id" in table.column_names:
                    ids.append(table["cell_id"].cast(pa.string()))
        compacted = read(folder / COMPACTED_NAME)
        if compacted is None:
            continue
        if ids:
            shadowed = pa.compute.is_in(compacted["cell_id"], value_set=pa.chunked_array(ids).combine_chunks())
            compacted = compacted.filter(pa.compute.invert(shadowed))
        cell = pa.compute.fill_null(compacted["cell_id"], "")
        tables.append(compacted)
        keys.append(pa.compute.binary_join_element_wise(_order_key((*folder.parts, "")), cell, ".parquet", "")
                    .combine_chunks())  # fmt: skip
    return [t.replace_schema_metadata(None) for t in tables], keys


def load_table(path: Path | str, on_corrupt: str = "raise", columns: list[str] | None = None) -> pa.Table | None:
    """Every row under a folder (or in one file) as one Arrow table in path order; None when there is none.

    `on_corrupt`: 'raise' stops at the first unreadable file, 'warn' skips it with one warning, 'skip' silently.
    ArrowInvalid/ArrowTypeError when one task column has two types in two files (`load` copes).
    """
    tables, keys = _gather(Path(path), on_corrupt, columns)
    return _in_path_order(tables, keys) if tables else None


def _path_order(keys: list[pa.Array]) -> pa.Array:
    return pa.compute.sort_indices(pa.chunked_array(keys, pa.string()))


def _in_path_order(tables: list[pa.Table], keys: list[pa.Array]) -> pa.Table:
    """One Arrow concat, one sort into path order, one take. Task columns missing from some files become nulls;
    contiguous columns, because chunked string columns make every later row selection slow."""
    return pa.concat_tables(tables, promote_options="permissive").take(_path_order(keys)).combine_chunks()


def load(path: Path | str, on_corrupt: str = "raise") -> pd.DataFrame:
    """Every row under a folder (or one file) as one DataFrame.

    `on_corrupt='raise'` stops at the first unreadable file; `'warn'` skips it
    with a warning, so one bad file does not hide every other result.
    """
    if on_corrupt not in ("raise", "warn"):
        raise ValueError(f"on_corrupt must be 'raise' or 'warn', not {on_corrupt!r}")
    tables, keys = _gather(Path(path), on_corrupt, None)
    if not tables:
        df = pd.DataFrame(columns=list(CORE_COLUMNS))
    else:
        try:
            df = _in_path_order(tables, keys).to_pandas()
        except (pa.ArrowInvalid, pa.ArrowTypeError):  # a task column with clashing types across files
            df = pd.concat([t.to_pandas() for t in tables], ignore_index=True, sort=False)
            df = df.iloc[_path_order(keys).to_numpy()].reset_index(drop=True)
    for col in CORE_COLUMNS:
        if col not in df.columns:
            df[col] = None
    return df


def finished_cells(results_dir: Path | str) -> set[str]:
    """cell_ids that already have an `ok` row: a re-run skips them. Unreadable files count as not finished.

    Compacted rows count; a loose row of the same cell in the same folder stands for it (it is newer).
    """
    table = load_table(results_dir, "skip", columns=["schema_version", "cell_id", "status"])
    if table is None:
        return set()
    ok = table.filter(pa.compute.equal(table["status"], "ok"))["cell_id"]
    return {c for c in ok.to_pylist() if c is not None}


# ---------------------------------------------------------------- compaction


@dataclass
class Compaction:
    """What `compact` did: for the one line the CLI prints, and for tests."""

    folders: int = 0  # folders written
    rows: int = 0  # rows now in their compacted files
    merged: int = 0  # loose files merged (and removed)
    unreadable: list[Path] = field(default_factory=list)  # loose files left as they were: corrupt or clashing

    def add(self, other: Compaction) -> None:
        self.folders += other.folders
        self.rows += other.rows
        self.merged += other.merged
        self.unreadable += other.unreadable


def compact(results_dir: Path | str) -> Compaction:
    """Compact every folder under `results_dir` (itself included) that has loose files, each on its own."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise FileNotFoundError(f"no results folder at {results_dir}")
    done = Compaction()
    for folder, loose in _folders(results_dir).items():
        if loose:
            done.add(_compact_folder(folder))
    return done


def _remove_merged(files: list[Path]) -> None:
    """The last step of a compaction: its own function, so a test can crash a compaction right before it."""
    for file in files:
        file.unlink(missing_ok=True)


def _compact_folder(folder: Path, new: pa.Table | None = None) -> Compaction:
    """Merge the folder's compacted file, its loose files and `new` rows (later wins) into its compacted file.

    Under the exclusive lock; the compacted file is renamed into place before any loose file is removed.
    A compacted file that cannot be read stops it (its rows must not be overwritten); unreadable loose files
    are left in place.
    """
    done = Compaction()
    with folder_lock(folder, exclusive=True):
        for stale in folder.glob(".*.parquet.*.tmp"):  # a killed writer's; none is being written under this lock
            stale.unlink(missing_ok=True)
        target = folder / COMPACTED_NAME
        old = read_table(target) if target.exists() else None
        files = sorted(p for p in folder.glob("*.parquet") if not p.name.startswith(".") and not is_compacted(p))
        loose: list[tuple[Path, pa.Table]] = []
        for file in files:
            try:
                table = read_table(file)
            except (CorruptResults, FileNotFoundError):
                table = None
            if table is None or "cell_id" not in table.column_names:  # no cell to keep once: left loose
                done.unreadable.append(file)
            else:
                loose.append((file, table))
        # Later wins: a file named after its cell is that cell's row; any other name (a stray copy) ranks below it.
        loose.sort(key=lambda ft: ft[0].stem == ft[1]["cell_id"][0].as_py())
        if not loose and new is None:
            return done
        kept = [t for t in (old, new) if t is not None]
        schema = _unify([t.schema for t in kept]) if kept else None
        merged: list[Path] = []
        parts = [old] if old is not None else []
        for file, table in loose:
            unified = _unify([schema, table.schema]) if schema is not None else table.schema
            if unified is None:  # a task column whose type clashes with the rows merged so far: left loose
                done.unreadable.append(file)
                continue
            schema = unified
            parts.append(table)
            merged.append(file)
        if new is not None:
            parts.append(new)
        parts = [t.replace_schema_metadata(None) for t in parts]
        table = pa.concat_tables(parts, promote_options="permissive")
        later = pd.Series(table["cell_id"].to_numpy(zero_copy_only=False)).duplicated(keep="last").to_numpy()
        table = table.filter(pa.array(~later))
        order = pa.compute.sort_indices(pa.compute.binary_join_element_wise(table["cell_id"], ".parquet", ""))
        table = table.take(order).combine_chunks()
        meta = {b"attnbench_schema": str(SCHEMA_VERSION).encode(), COMPACTED_MARK: b"1",
                b"attnbench_rows": str(table.num_rows).encode()}  # fmt: skip
        table = table.replace_schema_metadata(meta)
        atomic_write(target, lambda tmp: pq.write_table(table, tmp))
        _remove_merged(merged)
        return Compaction(folders=1, rows=table.num_rows, merged=len(merged), unreadable=done.unreadable)


def _unify(schemas: list[pa.Schema]) -> pa.Schema | None:
    try:
        return pa.unify_schemas(schemas, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return None


def main(argv: list[str] | None = None) -> int:
    """`python -m bench.results compact DIR`: one line, what was merged and removed."""
    parser = argparse.ArgumentParser(prog="python -m bench.results", description="Maintain a results folder.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("compact", help="merge each folder's loose per-cell files into its one compacted file")
    p.add_argument("results_dir", type=Path)
    args = parser.parse_args(argv)
    try:
        done = compact(args.results_dir)
    except (FileNotFoundError, CorruptResults) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    left = f"; {len(done.unreadable)} unreadable files left as they were" if done.unreadable else ""
    print(f"compacted {args.results_dir}: {done.merged} loose files merged and removed, {done.rows} rows in "
          f"{done.folders} {COMPACTED_NAME} file{'s' if done.folders != 1 else ''}{left}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
