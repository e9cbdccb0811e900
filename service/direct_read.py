"""The worker's fast path for a slice: each file read by itself, on the calling thread.

:func:`service.dataset.read_slice_table` reads a slice through a ``pyarrow.dataset``
scan. The scanner opens, reads and decodes every file on Arrow's I/O and CPU thread
pools, even with ``use_threads=False``: on a slice of many small files (one hive folder
per stratum) that costs ~0.59 ms of process CPU per file, only ~0.1 ms of it on the
calling thread; the rest runs on pool threads that compete with the fits of the other
workers sharing the cores. ``pyarrow.parquet.ParquetFile(pre_buffer=False)`` read with
``use_threads=False`` costs ~0.30 ms per file, all of it on the caller (measured on the
service benchmark's 2,000-row files; see ``benchmarks/README.md``).

:func:`read_direct` returns exactly what the scan would, or ``None`` when it cannot be
sure of that, and the caller then scans:

* the dataset schema must be known (the planner ships it): the scan would otherwise
  infer types from the slice's own files;
* every file must hold every column it is asked for with exactly the dataset schema's
  type (no schema evolution, no casts, no missing columns);
* hive partition values are parsed by pyarrow's own :class:`~pyarrow.dataset.HivePartitioning`
  (the one the scan uses) from the path below the root, and every partition column
  must get a value (``__HIVE_DEFAULT_PARTITION__`` gives a null, as in the scan);
* the job's filters and the strata predicate are the same
  :class:`~pyarrow.dataset.Expression`, evaluated by :meth:`pyarrow.Table.filter`
  after the partition columns are attached; the scan's row-group skipping by
  statistics changes which rows are decoded, not which are returned;
* the table carries the dataset schema, metadata included (``to_pandas`` reads the
  pandas metadata from it, as from the scan's table).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

__all__ = ["read_direct"]


def _partition_values(partitioning: ds.Partitioning | None, root_path: str, path: str,
                      names: Sequence[str]) -> dict[str, Any] | None:
    """The partition columns' values of one file, or ``None`` if one is not in its path."""
    if partitioning is None or not names:
        return {}
    prefix = root_path.rstrip("/") + "/"
    if not path.startswith(prefix):
        return None
    keys = ds.get_partition_keys(partitioning.parse(path[len(prefix):]))
    if any(n not in keys for n in names):
        return None
    return {n: keys[n] for n in names}


def _from_paths(values: list[Any], counts: np.ndarray, type_: pa.DataType) -> pa.Array:
    """A partition column: ``values[k]`` repeated ``counts[k]`` times (one take for all files)."""
    per_file = pa.array(values, type=type_)
    return per_file.take(pa.array(np.repeat(np.arange(len(values), dtype=np.int32), counts)))


def _read_file(fs: pafs.FileSystem, path: str, columns: list[str], want: pa.Schema,
               row_groups: Sequence[int] | None) -> pa.Table | None:
    """One file's ``columns`` (``None`` when a column is absent or typed otherwise)."""
    with fs.open_input_file(path) as fh:
        pf = pq.ParquetFile(fh, pre_buffer=False)
        have = pf.schema_arrow
        for c in columns:
            i = have.get_field_index(c)
            if i < 0 or not have.field(i).type.equals(want.field(c).type):
                return None
        if row_groups is None:
            return pf.read(columns=columns, use_threads=False)
        return pf.read_row_groups(list(row_groups), columns=columns, use_threads=False)


def read_direct(fs: pafs.FileSystem, root_path: str, files: Sequence[str],
                row_groups: Sequence[Sequence[int] | None] | None, schema: pa.Schema,
                partitioning: ds.Partitioning | None, partition_columns: Sequence[str],
                columns: Sequence[str], filter_columns: Sequence[str],
                expr: ds.Expression | None) -> pa.Table | None:
    """Read ``files`` one by one into the table a dataset scan would return.

    Parameters
    ----------
    fs : pyarrow.fs.FileSystem
        The dataset's filesystem.
    root_path : str
        The partition base folder (paths of ``files`` start with it).
    files : sequence of str
        The slice's files.
    row_groups : sequence or None
        ``None`` for every row group of every file, else one entry per file (a
        sequence of row-group ids, or ``None`` for all of that file's).
    schema : pyarrow.Schema
        The dataset schema (partition columns included).
    partitioning : pyarrow.dataset.Partitioning or None
        The hive partitioning with explicit field types, or ``None`` (no partitions).
    partition_columns : sequence of str
        Columns whose values come from the folder names.
    columns : sequence of str
        Columns to return, in order.
    filter_columns : sequence of str
        Columns ``expr`` refers to (read too, then dropped when not in ``columns``).
    expr : pyarrow.dataset.Expression or None
        Rows to keep.

    Returns
    -------
    pyarrow.Table or None
        The rows and columns of the scan, typed by ``schema``; ``None`` when the fast
        path does not apply (see the module docstring) and the caller must scan.

    Raises
    ------
    OSError, pyarrow.ArrowException
        A file cannot be read (the caller names it).
    """
    needed = list(dict.fromkeys([*columns, *filter_columns]))
    if any(c not in schema.names for c in needed):
        return None
    parts = set(partition_columns)
    if parts and partitioning is None:
        return None
    physical = [c for c in needed if c not in parts]
    from_path = [c for c in needed if c in parts]
    out_schema = pa.schema([schema.field(c) for c in needed], metadata=schema.metadata)
    tables, per_file = [], []
    for k, path in enumerate(files):
        values = _partition_values(partitioning, root_path, path, from_path)
        if values is None:
            return None
        t = _read_file(fs, path, physical, schema, None if row_groups is None else row_groups[k])
        if t is None:
            return None
        tables.append(t)
        per_file.append(values)
    counts = np.array([t.num_rows for t in tables], dtype=np.int64)
    arrays = []
    for c in needed:
        type_ = schema.field(c).type
        if c in parts:
            arrays.append(_from_paths([v[c] for v in per_file], counts, type_))
        else:
            arrays.append(pa.chunked_array([a for t in tables for a in t.column(c).chunks], type=type_))
    table = pa.Table.from_arrays(arrays, schema=out_schema)
    if expr is not None:
        table = table.filter(expr)
    if len(needed) != len(columns):
        table = table.select(list(columns))
    return table
