"""Parquet access with :mod:`pyarrow.dataset`, never loading the whole dataset on the client.

Two sides:

* the client (planner, validation) opens a :class:`DatasetHandle`: file discovery,
  schema (partition columns included), footers for validation and row-group
  statistics, and filter expressions built from the spec's triples (never ``eval``);
* a worker gets a small picklable :class:`SliceDescriptor` and calls
  :func:`read_slice`, which reads only the listed files/row groups and columns, with the
  job's filters and the strata predicate pushed down into the scan.

Discovery rules for :func:`open_dataset`:

* a file path is read as one Parquet file (whatever its name);
* a folder is searched recursively for ``*.parquet``, ``*.parq`` and ``*.pq`` files;
  names starting with ``.`` or ``_`` (``_SUCCESS``, ``.crc``, ...) are skipped;
* a path containing ``*``, ``?`` or ``[`` is a glob (``**`` crosses folders); the
  partition root is the folder before the first wildcard;
* hive partitioning (``partitioning="hive"``) is used when every file sits below the
  root in folders all named ``key=value``; ``__HIVE_DEFAULT_PARTITION__`` is a null;
* ``scheme://`` URIs are opened with :meth:`pyarrow.fs.FileSystem.from_uri`.
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from service.footers import FOOTER_THREADS, LOCAL_FOOTER_THREADS, FooterSummary, RowGroupStats
from service.footers import check_file, file_row_group_stats, threaded
from service.footers import read_footer as _footer

__all__ = [
    "DatasetError",
    "DatasetHandle",
    "SliceDescriptor",
    "RowGroupStats",
    "open_dataset",
    "read_slice",
    "read_slice_table",
    "filter_expression",
    "strata_expression",
    "PARQUET_SUFFIXES",
]

#: File name suffixes recognised as Parquet when a folder is searched.
PARQUET_SUFFIXES: tuple[str, ...] = (".parquet", ".parq", ".pq")

_GLOB_CHARS = re.compile(r"[*?\[]")
_HIVE_DIR = re.compile(r"^[^=/]+=[^/]*$")


class DatasetError(ValueError):
    """The dataset cannot be opened or read; the message names the path or file."""


# ------------------------------------------------------------------ descriptors


@dataclass(frozen=True)
class SliceDescriptor:
    """What a worker needs to read one task's rows: small, frozen and picklable.

    Attributes
    ----------
    root : str
        Dataset root (folder, or the file itself); a ``scheme://`` URI for remote data.
        Hive partition values are parsed from file paths relative to it.
    files : tuple of str
        Files to read (paths in the root's filesystem).
    row_groups : tuple or None
        ``None`` (all row groups of every file), or one entry per file: a tuple of
        row-group ids, or ``None`` for all of that file's row groups.
    columns : tuple of str
        Columns to return (the strata columns are always added).
    filters : tuple
        The spec's ``(column, op, value)`` triples.
    strata_columns : tuple of str
        Strata columns.
    strata_values : tuple of tuple
        One tuple of values (JSON form, as in :attr:`StratumPlan.values`) per stratum
        included; rows of other strata are not returned.
    partitioning : str or None
        ``"hive"`` or ``None``.
    partition_columns : tuple of str
        Columns coming from hive folder names.
    schema : bytes or None
        The dataset schema (Arrow IPC), so every worker reads with the same types
        instead of inferring them from its own subset of files.
    files_hold_strata : bool
        The planner chose ``files`` by their hive folder values and every strata column
        is a partition column, so each file holds rows of one listed stratum only: the
        worker need not push the strata predicate down again (the job's ``filters``
        still apply). Evaluating a predicate of many strata against every file's
        partition values costs ~0.15 ms per stratum, ~3% of a fit.
    """

    root: str
    files: tuple[str, ...]
    row_groups: tuple[tuple[int, ...] | None, ...] | None
    columns: tuple[str, ...]
    filters: tuple = ()
    strata_columns: tuple[str, ...] = ()
    strata_values: tuple[tuple, ...] = ()
    partitioning: str | None = None
    partition_columns: tuple[str, ...] = ()
    schema: bytes | None = None
    files_hold_strata: bool = False


# ------------------------------------------------------------------ discovery


def _is_uri(path: str) -> bool:
    return "://" in path


def _filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path inside it)``; local paths are made absolute."""
    if _is_uri(path):
        try:
            return pafs.FileSystem.from_uri(path)
        except (pa.ArrowException, ValueError) as exc:
            raise DatasetError(f"cannot open dataset {path}: {exc}") from None
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """Translate a glob (``*``, ``?``, ``[..]``, ``**``) to a regex over '/' paths."""
    out, i, n = [], 0, len(pattern)
    while i < n:
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:[^/]*/)*")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif c == "*":
            out.append("[^/]*")
            i += 1
        elif c == "?":
            out.append("[^/]")
            i += 1
        elif c == "[":
            j = pattern.find("]", i + 2 if pattern[i + 1:i + 2] in ("!", "]") else i + 1)
            if j < 0:
                out.append(re.escape(c))
                i += 1
            else:
                body = pattern[i + 1:j]
                if body.startswith("!"):
                    body = "^" + body[1:]
                out.append("[" + body.replace("\\", "\\\\") + "]")
                i = j + 1
        else:
            out.append(re.escape(c))
            i += 1
    return re.compile("".join(out) + r"\Z")


def _hidden(relative: str) -> bool:
    return any(part.startswith((".", "_")) and not _HIVE_DIR.match(part)
               for part in relative.split("/"))


def _relative(root: str, path: str) -> str:
    root = root.rstrip("/")
    return path[len(root) + 1:] if path.startswith(root + "/") else path


def _list_files(fs: pafs.FileSystem, folder: str, original: str) -> list[str]:
    try:
        infos = fs.get_file_info(pafs.FileSelector(folder, recursive=True))
    except (OSError, pa.ArrowException) as exc:
        raise DatasetError(f"cannot list dataset folder {original}: {exc}") from None
    return sorted(i.path for i in infos if i.type == pafs.FileType.File)


def _discover(path: str) -> tuple[pafs.FileSystem, str, str, list[str], bool]:
    """``(fs, root_for_descriptor, root_path, files, is_folder_or_glob)``."""
    if not path:
        raise DatasetError("empty dataset path")
    match = _GLOB_CHARS.search(path)
    if match:
        cut = path.rfind("/", 0, match.start())
        base = path[:cut] if cut > 0 else ("/" if cut == 0 else ".")
        fs, base_path = _filesystem(base)
        if not _is_uri(path):
            pattern_path = os.path.join(base_path, path[cut + 1:] if cut >= 0 else path)
        else:
            pattern_path = base_path.rstrip("/") + "/" + path[cut + 1:]
        info = fs.get_file_info(base_path)
        if info.type != pafs.FileType.Directory:
            raise DatasetError(f"dataset {path} not found (folder {base} does not exist)")
        regex = _glob_regex(pattern_path)
        files = [f for f in _list_files(fs, base_path, path)
                 if regex.match(f) and not _hidden(_relative(base_path, f))]
        if not files:
            raise DatasetError(f"no Parquet files matched {path}")
        root = base if _is_uri(path) else base_path
        return fs, root, base_path, files, True
    fs, local = _filesystem(path)
    try:
        info = fs.get_file_info(local)
    except (OSError, pa.ArrowException) as exc:
        raise DatasetError(f"cannot open dataset {path}: {exc}") from None
    if info.type == pafs.FileType.NotFound:
        raise DatasetError(f"dataset {path} not found")
    root = path.rstrip("/") if _is_uri(path) else local
    if info.type == pafs.FileType.File:
        return fs, root, local, [local], False
    files = [f for f in _list_files(fs, local, path)
             if f.lower().endswith(PARQUET_SUFFIXES) and not _hidden(_relative(local, f))]
    if not files:
        raise DatasetError(
            f"no Parquet files in dataset folder {path} "
            f"(looked for {', '.join('*' + s for s in PARQUET_SUFFIXES)}, recursively)"
        )
    return fs, root, local, files, True


def _looks_hive(root_path: str, files: Sequence[str]) -> bool:
    for f in files:
        parts = _relative(root_path, f).split("/")[:-1]
        if not parts or not all(_HIVE_DIR.match(p) for p in parts):
            return False
    return True


# ------------------------------------------------------------------ handle


class DatasetHandle:
    """An opened Parquet dataset (metadata only; nothing is read until asked).

    Use :func:`open_dataset` to create one.

    Attributes
    ----------
    path : str
        The path as given.
    root : str
        Partition root (folder, glob base or the file itself; URI for remote data).
    files : tuple of str
        Parquet files, sorted.
    partitioning : str or None
        ``"hive"`` or ``None``.
    dataset : pyarrow.dataset.FileSystemDataset
    filesystem : pyarrow.fs.FileSystem
    footers : service.footers.FooterSummary or None
        What :meth:`validate` kept of the footers (row counts, and row-group statistics
        of the columns it was asked for); :meth:`file_row_counts` and
        :meth:`row_group_stats` answer from it instead of reading the footers again.
        ``None`` before :meth:`validate`.
    """

    def __init__(self, path: str, fs: pafs.FileSystem, root: str, root_path: str,
                 files: Sequence[str], partitioning: str | None,
                 dataset: ds.FileSystemDataset) -> None:
        self.path = path
        self.filesystem = fs
        self.root = root
        self._root_path = root_path
        self.files = tuple(files)
        self.partitioning = partitioning
        self.dataset = dataset
        self.footers: FooterSummary | None = None

    def __repr__(self) -> str:
        return (f"DatasetHandle({self.path!r}, files={len(self.files)}, "
                f"partitioning={self.partitioning!r})")

    @property
    def _footer_threads(self) -> int:
        local = isinstance(self.filesystem, pafs.LocalFileSystem)
        return LOCAL_FOOTER_THREADS if local else FOOTER_THREADS

    def _footers_of(self, files: Sequence[str]) -> Iterator[tuple[str, pq.FileMetaData]]:
        return threaded(lambda p: (p, _footer(self.filesystem, p)), list(files),
                        self._footer_threads)

    def file_row_counts(self, files: Sequence[str] | None = None) -> Iterator[tuple[str, int]]:
        """``(file, rows)`` from each file's footer (metadata only, bounded memory).

        Parameters
        ----------
        files : sequence of str, optional
            Default: all files.

        Yields
        ------
        tuple of (str, int)
            In file order; from :attr:`footers` when :meth:`validate` has seen them.

        Raises
        ------
        DatasetError
            An unreadable file (named).
        """
        files = list(self.files if files is None else files)
        kept = self.footers.row_counts(files) if self.footers is not None else None
        if kept is not None:
            yield from kept
            return
        for path, md in self._footers_of(files):
            yield path, int(md.num_rows)

    @property
    def schema(self) -> pa.Schema:
        """Dataset schema, hive partition columns included (last)."""
        return self.dataset.schema

    @property
    def partition_columns(self) -> tuple[str, ...]:
        """Columns whose values come from hive folder names."""
        part = self.dataset.partitioning
        if part is None or self.partitioning is None:
            return ()
        return tuple(part.schema.names)

    def filter_expression(self, filters: Iterable[Sequence[Any]]) -> ds.Expression | None:
        """Expression for the spec's filter triples against this schema.

        See :func:`filter_expression`.
        """
        return filter_expression(filters, self.schema)

    def file_partitions(self) -> list[tuple[str, dict[str, Any]]]:
        """``(file, {partition column: value})`` for every file (``None`` = null folder)."""
        cols = self.partition_columns
        out = []
        for frag in self.dataset.get_fragments():
            keys = ds.get_partition_keys(frag.partition_expression) if cols else {}
            out.append((frag.path, {c: keys.get(c) for c in cols}))
        return out

    def validate(self, columns: Iterable[str] | None = None, *,
                 stats_columns: Iterable[str] = ()) -> int:
        """Read every file's footer (metadata only) and check it against the schema.

        What planning needs from the footers is kept in :attr:`footers`, so that the
        job's planning does not read them again.

        Parameters
        ----------
        columns : iterable of str, optional
            Columns (other than partition columns) every file must contain.
        stats_columns : iterable of str, optional
            Columns whose row-group statistics to keep for :meth:`row_group_stats`
            (partition columns are ignored).

        Returns
        -------
        int
            Total number of rows.

        Raises
        ------
        DatasetError
            Naming the first (in file order) unreadable file with pyarrow's error, a
            file lacking a required column, or a column type that cannot be cast to the
            dataset schema's.
        """
        part = self.partition_columns
        needed = [c for c in (columns or ()) if c not in part]
        stats_cols = tuple(dict.fromkeys(c for c in stats_columns if c not in part))
        schema = self.schema
        rows: dict[str, int] = {}
        stats: list[RowGroupStats] = []
        passed: list = []

        def check(path: str) -> tuple[str, Any]:
            try:
                return path, _footer(self.filesystem, path)
            except DatasetError as exc:
                return path, exc

        for path, md in threaded(check, list(self.files), self._footer_threads):
            if isinstance(md, DatasetError):
                raise md
            rows[path] = int(md.num_rows)
            check_file(md, path, schema, needed, passed)
            if stats_cols:
                stats.extend(file_row_group_stats(md, path, stats_cols))
        self.footers = FooterSummary(rows, stats_cols, tuple(stats))
        return sum(rows.values())

    def row_group_stats(self, columns: Sequence[str],
                        files: Sequence[str] | None = None) -> Iterator[RowGroupStats]:
        """Footer statistics of ``columns`` for every row group (metadata only).

        Parameters
        ----------
        columns : sequence of str
            Non-partition columns (others are ignored).
        files : sequence of str, optional
            Default: all files.

        Yields
        ------
        RowGroupStats
            In file order, then row-group order; from :attr:`footers` when
            :meth:`validate` kept these columns' statistics.
        """
        wanted = [c for c in columns if c not in self.partition_columns]
        kept = self.footers.row_group_stats(wanted, files) if self.footers is not None else None
        if kept is not None:
            yield from kept
            return
        for path, md in self._footers_of(self.files if files is None else files):
            yield from file_row_group_stats(md, path, wanted)

    def descriptor(self, *, columns: Sequence[str], filters: Sequence = (),
                   strata_columns: Sequence[str] = (), strata_values: Sequence[tuple] = (),
                   files: Sequence[str] | None = None,
                   row_groups: Sequence[tuple[int, ...] | None] | None = None,
                   files_hold_strata: bool = False,
                   ) -> SliceDescriptor:
        """Build a :class:`SliceDescriptor` for (a subset of) this dataset.

        Parameters
        ----------
        columns, filters, strata_columns, strata_values, files, row_groups
            See :class:`SliceDescriptor`; ``files`` defaults to every file.
        files_hold_strata : bool, default False
            See :class:`SliceDescriptor`; only honoured when ``files`` is given, the
            dataset is hive-partitioned and every strata column is a partition column.

        Returns
        -------
        SliceDescriptor
        """
        files_t = tuple(self.files if files is None else files)
        if row_groups is not None:
            row_groups = tuple(None if r is None else tuple(int(i) for i in r) for r in row_groups)
            if len(row_groups) != len(files_t):
                raise ValueError("row_groups needs one entry per file")
            if all(r is None for r in row_groups):
                row_groups = None
        return SliceDescriptor(
            root=self.root,
            files=files_t,
            row_groups=row_groups,
            columns=tuple(columns),
            filters=tuple(tuple(t) for t in filters),
            strata_columns=tuple(strata_columns),
            strata_values=tuple(tuple(v) for v in strata_values),
            partitioning=self.partitioning,
            partition_columns=self.partition_columns,
            schema=self.schema.serialize().to_pybytes(),
            files_hold_strata=bool(
                files_hold_strata and files is not None and self.partitioning == "hive"
                and bool(strata_columns)
                and all(c in self.partition_columns for c in strata_columns)),
        )


def open_dataset(path: str | os.PathLike) -> DatasetHandle:
    """Discover a Parquet dataset (see the module docstring for the rules).

    Only the first file's footer is read (for the schema); call
    :meth:`DatasetHandle.validate` to check every file.

    Parameters
    ----------
    path : str or path-like
        File, folder, glob or URI.

    Returns
    -------
    DatasetHandle

    Raises
    ------
    DatasetError
        Not found, no Parquet files matched, or an unreadable file (named).
    """
    path = os.fspath(path)
    fs, root, root_path, files, is_folder = _discover(path)
    hive = is_folder and _looks_hive(root_path, files)
    partitioning = "hive" if hive else None
    try:
        dataset = ds.dataset(
            files, format="parquet", filesystem=fs,
            partitioning=ds.HivePartitioning.discover(infer_dictionary=False) if hive else None,
            partition_base_dir=root_path if hive else None,
        )
    except (OSError, pa.ArrowException, ValueError) as exc:
        # find the culprit by name (schema inference reads one footer)
        for f in files:
            _footer(fs, f)
        raise DatasetError(f"cannot open dataset {path}: {exc}") from None
    return DatasetHandle(path, fs, root, root_path, files, partitioning, dataset)


# ------------------------------------------------------------------ expressions


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "str"
    return type(value).__name__


def _scalar(column: str, value: Any, type_: pa.DataType) -> pa.Scalar:
    """A scalar comparable with a column of ``type_`` (no silent str/number mix-ups)."""
    t = type_.value_type if pa.types.is_dictionary(type_) else type_
    kind = _kind(value)
    textual = pa.types.is_string(t) or pa.types.is_large_string(t) or \
        getattr(pa.types, "is_string_view", lambda _t: False)(t)
    numeric = pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)
    ok = (
        (kind == "str" and (textual or pa.types.is_temporal(t)))
        or (kind in ("int", "float") and numeric)
        or (kind == "bool" and pa.types.is_boolean(t))
    )
    if not ok:
        raise DatasetError(
            f"value {value!r} ({kind}) is not comparable with column {column!r} of type {type_}"
        )
    try:
        if kind == "str":
            return pa.scalar(value).cast(t)
        if kind == "int" and pa.types.is_integer(t):
            try:
                return pa.scalar(value, type=t)
            except (pa.ArrowException, OverflowError):
                return pa.scalar(value)
        return pa.scalar(value)
    except (pa.ArrowException, ValueError, OverflowError) as exc:
        raise DatasetError(
            f"value {value!r} cannot be read as {t} for column {column!r}: {exc}"
        ) from None


def _field_type(schema: pa.Schema, column: str) -> pa.DataType:
    idx = schema.get_field_index(column)
    if idx < 0:
        raise DatasetError(f"unknown column {column!r} (columns: {', '.join(schema.names)})")
    return schema.field(idx).type


def _and_all(exprs: Sequence[ds.Expression]) -> ds.Expression | None:
    return _reduce(list(exprs), lambda a, b: a & b)


def _or_all(exprs: Sequence[ds.Expression]) -> ds.Expression | None:
    return _reduce(list(exprs), lambda a, b: a | b)


def _reduce(exprs: list, op) -> Any:
    """Balanced reduction (no deep recursion for long lists)."""
    if not exprs:
        return None
    while len(exprs) > 1:
        exprs = [op(exprs[i], exprs[i + 1]) if i + 1 < len(exprs) else exprs[i]
                 for i in range(0, len(exprs), 2)]
    return exprs[0]


def filter_expression(filters: Iterable[Sequence[Any]], schema: pa.Schema) -> ds.Expression | None:
    """Build a :mod:`pyarrow.compute` expression from ``(column, op, value)`` triples.

    Comparisons follow SQL: a row whose column is null never passes a filter (also not
    ``!=`` or ``not in``). Values are cast to the column's type (ISO strings to dates and
    timestamps); strings are never compared with numbers.

    Parameters
    ----------
    filters : iterable of (str, str, value)
        ``op`` is one of ``== != < <= > >= in not in``; ``value`` is a list/tuple for
        ``in``/``not in``.
    schema : pyarrow.Schema

    Returns
    -------
    pyarrow.dataset.Expression or None
        ``None`` when there are no filters.

    Raises
    ------
    DatasetError
        Unknown column or operator, or a value not comparable with the column.
    """
    exprs = []
    for triple in filters:
        column, op, value = triple
        t = _field_type(schema, column)
        f = pc.field(column)
        if op in ("in", "not in"):
            values = list(value) if isinstance(value, (list, tuple)) else [value]
            scalars = [_scalar(column, v, t) for v in values]
            kinds = {s.type for s in scalars}
            arr = pa.array([s.as_py() for s in scalars], type=kinds.pop() if len(kinds) == 1 else None)
            e = f.isin(arr)
            exprs.append(e if op == "in" else (~e & f.is_valid()))
            continue
        s = _scalar(column, value, t)
        if op == "==":
            exprs.append(f == s)
        elif op == "!=":
            exprs.append(f != s)
        elif op == "<":
            exprs.append(f < s)
        elif op == "<=":
            exprs.append(f <= s)
        elif op == ">":
            exprs.append(f > s)
        elif op == ">=":
            exprs.append(f >= s)
        else:
            raise DatasetError(f"unknown filter operator {op!r} for column {column!r}")
    return _and_all(exprs)


def strata_expression(strata_columns: Sequence[str], strata_values: Sequence[Sequence[Any]],
                      schema: pa.Schema) -> ds.Expression | None:
    """Rows belonging to exactly the listed strata.

    Parameters
    ----------
    strata_columns : sequence of str
    strata_values : sequence of tuple
        One value tuple per stratum (JSON form; ``None`` for null).
    schema : pyarrow.Schema

    Returns
    -------
    pyarrow.dataset.Expression or None
        ``None`` without strata columns. A per-column ``isin`` (which lets pyarrow skip
        row groups by their statistics) and, for several columns, the exact
        combinations.
    """
    if not strata_columns:
        return None
    per_column = []
    for j, c in enumerate(strata_columns):
        t = _field_type(schema, c)
        vals = {v[j] for v in strata_values}
        present = [v for v in vals if v is not None]
        parts = []
        if present:
            scal = [_scalar(c, v, t) for v in sorted(present, key=repr)]
            parts.append(pc.field(c).isin(pa.array([s.as_py() for s in scal], type=scal[0].type)))
        if None in vals:
            parts.append(pc.field(c).is_null())
        per_column.append(_or_all(parts) if parts else pc.scalar(False))
    expr = _and_all(per_column)
    if len(strata_columns) > 1 and len(strata_values) > 1:
        combos = []
        for values in strata_values:
            terms = [pc.field(c).is_null() if v is None else pc.field(c) == _scalar(c, v, _field_type(schema, c))
                     for c, v in zip(strata_columns, values)]
            combos.append(_and_all(terms))
        expr = expr & _or_all(combos)
    return expr


# ------------------------------------------------------------------ worker side


def _filesystem_for_root(root: str) -> tuple[pafs.FileSystem, str]:
    return _filesystem(root)


def _descriptor_parts(d: SliceDescriptor) -> tuple[pafs.FileSystem, str, pa.Schema | None, Any]:
    """A slice's filesystem, partition root, dataset schema and partitioning."""
    fs, root_path = _filesystem_for_root(d.root)
    schema = pa.ipc.read_schema(pa.py_buffer(d.schema)) if d.schema is not None else None
    partitioning: Any = None
    if d.partitioning == "hive":
        if schema is not None and d.partition_columns:
            partitioning = ds.HivePartitioning(pa.schema([schema.field(c) for c in d.partition_columns]))
        else:
            partitioning = ds.HivePartitioning.discover(infer_dictionary=False)
    return fs, root_path, schema, partitioning


def _descriptor_dataset(d: SliceDescriptor, fs: pafs.FileSystem, root_path: str,
                        schema: pa.Schema | None, partitioning: Any) -> ds.Dataset:
    try:
        dataset = ds.dataset(list(d.files), schema=schema, format="parquet", filesystem=fs,
                             partitioning=partitioning,
                             partition_base_dir=root_path if partitioning is not None else None)
    except (OSError, pa.ArrowException, ValueError) as exc:
        for f in d.files:
            _footer(fs, f)
        raise DatasetError(f"cannot open slice of dataset {d.root}: {exc}") from None
    if d.row_groups is not None:
        wanted = dict(zip(d.files, d.row_groups))
        frags = []
        for frag in dataset.get_fragments():
            rg = wanted.get(frag.path)
            frags.append(frag if rg is None else frag.subset(row_group_ids=list(rg)))
        dataset = ds.FileSystemDataset(frags, dataset.schema, dataset.format, fs)
    return dataset


def _columns_and_filter(d: SliceDescriptor, schema: pa.Schema) -> tuple[list[str], ds.Expression | None]:
    columns = list(dict.fromkeys([*d.columns, *d.strata_columns]))
    missing = [c for c in columns if c not in schema.names]
    if missing:
        raise DatasetError(f"dataset {d.root} has no column(s) {', '.join(map(repr, missing))}")
    strata = None if d.files_hold_strata else strata_expression(d.strata_columns, d.strata_values, schema)
    expr = _and_all([e for e in (filter_expression(d.filters, schema), strata) if e is not None])
    return columns, expr


def read_slice_table(descriptor: SliceDescriptor, *, direct: bool = True) -> pa.Table:
    """Read one slice as an Arrow table (see :func:`read_slice`).

    Parameters
    ----------
    descriptor : SliceDescriptor
    direct : bool, default True
        Read file by file on the calling thread (:func:`service.direct_read.read_direct`)
        when that gives exactly the scan's table; ``False`` always scans with
        ``pyarrow.dataset`` (the reference the tests compare the fast path with).

    Returns
    -------
    pyarrow.Table
    """
    from service.direct_read import read_direct

    d = descriptor
    if not d.files:
        raise DatasetError(f"slice of dataset {d.root} lists no files")
    fs, root_path, schema, partitioning = _descriptor_parts(d)
    if direct and schema is not None:
        columns, expr = _columns_and_filter(d, schema)
        filter_columns = [f[0] for f in d.filters if f and isinstance(f[0], str)]
        try:
            table = read_direct(fs, root_path, d.files, d.row_groups, schema, partitioning,
                                d.partition_columns, columns, filter_columns, expr)
        except (OSError, pa.ArrowException, ValueError):
            table = None  # the scan below reads again and names the file that fails
        if table is not None:
            return table
    dataset = _descriptor_dataset(d, fs, root_path, schema, partitioning)
    columns, expr = _columns_and_filter(d, dataset.schema)
    try:
        # single-threaded like the worker it runs on (one task per worker thread): no
        # hand-offs to Arrow's CPU pool competing with the other workers' fits
        return dataset.to_table(columns=columns, filter=expr, use_threads=False)
    except (OSError, pa.ArrowException) as exc:
        raise DatasetError(f"reading slice of dataset {d.root} failed: {exc}") from None


def read_slice(descriptor: SliceDescriptor) -> pd.DataFrame:
    """Read one task's rows (runs on a worker).

    Reads only ``descriptor.files`` (and row groups), only ``columns`` plus the strata
    columns, with the job's filters and the strata predicate pushed down into the
    scan. Dictionary columns become pandas categoricals; hive partition columns are
    ordinary columns.

    Parameters
    ----------
    descriptor : SliceDescriptor

    Returns
    -------
    pandas.DataFrame

    Raises
    ------
    DatasetError
        A file is missing or unreadable (named), or a column is missing.
    """
    # single-threaded like the read itself (the worker's cores are busy with fits): on an
    # 83-stratum slice of the service benchmark, 2.9 instead of 3.1-3.2 ms of CPU
    return read_slice_table(descriptor).to_pandas(use_threads=False)
