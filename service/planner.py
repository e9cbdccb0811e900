"""List the strata of a job and pack them into tasks.

Two stages, each callable alone:

* :func:`plan_strata` scans **only the strata columns** (the job's filters pushed down)
  batch by batch, counting rows per distinct value combination with Arrow's hash
  aggregation; client memory is bounded by the number of strata, not the data size.
* :func:`plan_tasks` packs consecutive strata (in key order) into :class:`Task` s of
  roughly ``max_task_seconds`` of work and gives each a
  :class:`~service.dataset.SliceDescriptor` that lists only the files (hive folders)
  and row groups (footer min/max statistics) that can hold its strata.

Stratum keys
------------
``"region=north/year=2021"``: ``column=value`` joined by ``/`` in the spec's strata
order; ``""`` when the job has no strata columns (one stratum with every row).
Values: integers without ``.0``, booleans ``true``/``false``, dates ISO
(``2021-03-01``), strings raw except that ``%``, ``/`` and ``=`` are percent-encoded
(so keys are unambiguous). Null values form their own stratum, shown as ``__null__``
(a string value that is literally ``__null__`` is written ``%5F_null__``).
:attr:`StratumPlan.values` holds JSON values: ``None`` for null, ISO strings for
dates.

Strata are sorted by their values (natural order per column, nulls last). Strata with
no rows after filtering do not exist, so a job whose filters remove every row has no
strata.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)

from service.dataset import DatasetHandle, SliceDescriptor
from service.spec import JobSpec, used_columns
from storage.records import StratumPlan

__all__ = [
    "Task",
    "plan_strata",
    "plan_tasks",
    "stratum_key",
    "format_value",
    "estimate_seconds",
    "DEFAULT_TARGET_ROWS",
    "MAX_STRATA_PER_TASK",
    "MIN_TASKS",
    "ROWS_PER_SECOND",
    "OVERHEAD_ROWS",
    "NULL_TOKEN",
]

#: Rows fitted per second by one worker thread (rough, GLMM Laplace; cost model slope).
#: Measured on the issue #5 strata (binomial, ~2,000 rows, one random intercept): 250-
#: 400k rows/s inside ``fit_many`` and 200-250k with ``fit``, slice reading included, on
#: the slower VM of 2026-11-24; 360-500k with ``fit_many`` on that of 2026-12-07.
ROWS_PER_SECOND = 200_000
#: Fixed cost of one stratum's fit, in row equivalents (model frame, optimiser start).
OVERHEAD_ROWS = 400
#: Default task size in row equivalents (``max_task_seconds = 1``). Every task costs
#: the coordinator (scheduler, client, result transfer) ~9-11 ms of CPU and the
#: worker's event loop a few ms more, and ``fit_many`` fits a task's strata in blocks
#: of up to 24,000 rows: measured on 2,000 strata of ~2,000 rows (one worker),
#: 20,000-row tasks (8 strata) took 11.7 ms of worker CPU and 1.5 ms of scheduler CPU
#: per stratum, 50,000-row tasks (21 strata) 10.1 and 0.8, 120,000-row tasks (50
#: strata) 10.0 and 0.5 (2026-11-24); on 2026-12-07 `stratafit run` of the same 2,000
#: strata took 12.9-14.2 s of CPU (all processes, one worker) with 154,000-row tasks (64
#: strata) against 14.7-16.9 s with 98,400-row ones (41 strata). Larger tasks also mean a
#: longer tail (the last task of a job) and more strata sharing the fate of a task whose
#: worker dies: see :data:`MIN_TASKS`.
DEFAULT_TARGET_ROWS = 200_000
#: Upper bound of strata per task, so results stream back while a job runs.
MAX_STRATA_PER_TASK = 96
#: With the default target, a job is cut into at least this many tasks when its strata
#: allow it (the target shrinks to ``total cost / MIN_TASKS``), so the workers of a
#: small job share its work evenly instead of one worker fitting the last big task
#: alone (200 strata in 3 tasks on 2 workers: 117% of the even share for one of them).
MIN_TASKS = 8
#: How a null strata value appears in a key.
NULL_TOKEN = "__null__"

_COMPACT_EVERY = 64  # partial aggregates held before they are merged


@dataclass(frozen=True)
class Task:
    """A unit of work for one worker: a few strata and how to read their rows.

    Attributes
    ----------
    task_id : str
        Stable id derived from the strata keys (``"t-" + 16 hex digits``).
    strata : tuple of StratumPlan
        In key order.
    descriptor : SliceDescriptor
        Reads exactly the rows of these strata (after the job's filters).
    est_rows : int
        Sum of the strata row counts.
    """

    task_id: str
    strata: tuple[StratumPlan, ...]
    descriptor: SliceDescriptor
    est_rows: int

    @property
    def keys(self) -> tuple[str, ...]:
        """The strata keys of this task."""
        return tuple(s.key for s in self.strata)


# ------------------------------------------------------------------ keys


def _escape(text: str) -> str:
    return text.replace("%", "%25").replace("/", "%2F").replace("=", "%3D")


def format_value(value: Any) -> str:
    """Format one strata value for a stratum key (see the module docstring).

    Parameters
    ----------
    value : None, bool, int, str, date or numpy scalar

    Returns
    -------
    str
    """
    if value is None:
        return NULL_TOKEN
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value.is_integer():
            return str(int(value))
        return repr(value)
    if isinstance(value, (_dt.date, _dt.datetime)):
        return value.isoformat()
    text = str(value)
    if text == NULL_TOKEN:
        return "%5F" + text[1:]
    return _escape(text)


def stratum_key(columns: Sequence[str], values: Sequence[Any]) -> str:
    """Canonical key of one stratum, e.g. ``"region=north/year=2021"``.

    Parameters
    ----------
    columns : sequence of str
        Strata columns in spec order.
    values : sequence
        One value per column (``None`` for null).

    Returns
    -------
    str
        ``""`` when ``columns`` is empty.
    """
    return "/".join(f"{_escape(c)}={format_value(v)}" for c, v in zip(columns, values))


def _json_value(value: Any) -> Any:
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, (_dt.date, _dt.datetime)):
        return value.isoformat()
    return value


# ------------------------------------------------------------------ strata


def _decode(table: pa.Table) -> pa.Table:
    """Dictionary columns → their value type (dictionaries differ between batches)."""
    cols = []
    for col in table.columns:
        if pa.types.is_dictionary(col.type):
            col = col.cast(col.type.value_type)
        cols.append(col)
    return pa.table(cols, names=table.column_names)


def _merge(partials: list[pa.Table], columns: list[str]) -> pa.Table:
    merged = pa.concat_tables(partials)
    out = merged.group_by(columns, use_threads=False).aggregate([("count_all", "sum")])
    return out.rename_columns(["count_all" if n == "count_all_sum" else n for n in out.column_names])


def plan_strata(handle: DatasetHandle, spec: JobSpec) -> list[StratumPlan]:
    """List the distinct strata with their row counts (after the spec's filters).

    Reads only the strata columns (and, inside the scan, the filter columns), one
    record batch at a time; partial counts are merged as they accumulate, so memory
    stays proportional to the number of strata. When every strata column and every
    filter column is a hive partition column, no data is read at all: strata come
    from the folder names and row counts from the file footers.

    Parameters
    ----------
    handle : DatasetHandle
    spec : JobSpec
        Uses ``strata`` and ``filters``.

    Returns
    -------
    list of StratumPlan
        Sorted by values (nulls last); one stratum with key ``""`` when the spec has no
        strata columns; empty when no row passes the filters.
    """
    expr = handle.filter_expression(spec.filters)
    columns = list(spec.strata)
    if not columns:
        n = handle.dataset.count_rows(filter=expr)
        return [StratumPlan(key="", values={}, nrows=int(n))] if n else []

    part = set(handle.partition_columns)
    if part and set(columns) <= part and {f[0] for f in spec.filters} <= part:
        counts = _partition_counts(handle, columns, expr)
        return _plans_from_counts(counts, columns) if counts is not None else []

    scanner = handle.dataset.scanner(columns=columns, filter=expr, batch_size=1 << 17)
    partials: list[pa.Table] = []
    for batch in scanner.to_batches():
        if batch.num_rows == 0:
            continue
        table = _decode(pa.Table.from_batches([batch]))
        partials.append(table.group_by(columns, use_threads=False).aggregate([([], "count_all")]))
        if len(partials) >= _COMPACT_EVERY:
            partials = [_merge(partials, columns)]
    if not partials:
        return []
    return _plans_from_counts(_merge(partials, columns), columns)


def _partition_counts(handle: DatasetHandle, columns: list[str], expr: Any) -> pa.Table | None:
    """Row counts per strata when strata and filters use only hive partition columns.

    No data is read: each file's strata values come from its folder names, the job's
    filters are evaluated on those values (a file passes or fails as a whole) and row
    counts come from the footers of the files that pass. ``None`` when no row passes.
    """
    schema = handle.schema
    part_cols = list(handle.partition_columns)
    files: list[str] = []
    values: dict[str, list] = {c: [] for c in part_cols}
    for path, vals in handle.file_partitions():
        files.append(path)
        for c in part_cols:
            values[c].append(vals.get(c))
    table = pa.table({c: pa.array(values[c], type=schema.field(c).type) for c in part_cols})
    table = table.append_column("__file__", pa.array(range(len(files)), type=pa.int64()))
    if expr is not None:
        table = table.filter(expr)
    if table.num_rows == 0:
        return None
    keep = table.column("__file__").to_pylist()
    nrows = [n for _, n in handle.file_row_counts([files[i] for i in keep])]
    table = _decode(table.select(columns)).append_column(
        "count_all", pa.array(nrows, type=pa.int64()))
    table = table.filter(pa.compute.greater(table.column("count_all"), 0))
    if table.num_rows == 0:
        return None
    return _merge([table], columns)


def _plans_from_counts(counts: pa.Table, columns: list[str]) -> list[StratumPlan]:
    """Aggregated ``(strata columns..., count_all)`` → sorted :class:`StratumPlan` s."""
    counts = counts.sort_by([(c, "ascending") for c in columns])  # nulls last (default)

    values_by_col = [counts.column(c).to_pylist() for c in columns]
    nrows = counts.column("count_all").to_pylist()
    plans = []
    for i, n in enumerate(nrows):
        row = [values_by_col[j][i] for j in range(len(columns))]
        plans.append(StratumPlan(
            key=stratum_key(columns, row),
            values={c: _json_value(v) for c, v in zip(columns, row)},
            nrows=int(n),
        ))
    return plans


# ------------------------------------------------------------------ tasks


def estimate_seconds(nrows: int | np.ndarray) -> float | np.ndarray:
    """Rough wall time of fitting a stratum of ``nrows`` rows: ``a + b * nrows``.

    Parameters
    ----------
    nrows : int or ndarray

    Returns
    -------
    float or ndarray
    """
    return (OVERHEAD_ROWS + np.asarray(nrows, dtype=float)) / ROWS_PER_SECOND


def _target_rows(spec: JobSpec, target_rows_per_task: int | None,
                 strata: Sequence[StratumPlan]) -> float:
    """Task size: the caller's, the spec's ``max_task_seconds``, else the default
    shrunk so that the job has at least :data:`MIN_TASKS` tasks."""
    if target_rows_per_task is not None:
        if target_rows_per_task <= 0:
            raise ValueError(f"target_rows_per_task must be positive, got {target_rows_per_task}")
        return float(target_rows_per_task)
    if spec.max_task_seconds is not None:
        return spec.max_task_seconds * ROWS_PER_SECOND
    total = float(sum(OVERHEAD_ROWS + s.nrows for s in strata))
    return min(float(DEFAULT_TARGET_ROWS), total / MIN_TASKS)


def _pack(strata: Sequence[StratumPlan], target: float, max_strata: int) -> list[list[StratumPlan]]:
    """Greedy, order-preserving packing by cost ``OVERHEAD_ROWS + nrows``.

    A stratum costlier than ``target`` goes alone; no group exceeds ``target`` in rows
    otherwise, nor ``max_strata`` strata.
    """
    groups: list[list[StratumPlan]] = []
    current: list[StratumPlan] = []
    cost = 0.0
    for s in strata:
        c = OVERHEAD_ROWS + s.nrows
        if current and (cost + c > target or len(current) >= max_strata):
            groups.append(current)
            current, cost = [], 0.0
        current.append(s)
        cost += c
    if current:
        groups.append(current)
    return groups


def _task_id(keys: Sequence[str]) -> str:
    return "t-" + hashlib.sha256("\x1f".join(keys).encode("utf-8")).hexdigest()[:16]


def _raw_value(value: Any, type_: pa.DataType) -> Any:
    """JSON strata value → the Python value Parquet statistics hold."""
    t = type_.value_type if pa.types.is_dictionary(type_) else type_
    if value is not None and pa.types.is_date(t) and isinstance(value, str):
        return _dt.date.fromisoformat(value)
    return value


class _RowGroupIndex:
    """Footer min/max of the non-partition strata columns, as flat arrays."""

    def __init__(self, handle: DatasetHandle, columns: Sequence[str]) -> None:
        codes: list[int] = []
        ids: list[int] = []
        mins: dict[str, list] = {c: [] for c in columns}
        maxs: dict[str, list] = {c: [] for c in columns}
        nulls: dict[str, list] = {c: [] for c in columns}
        self.file_names: list[str] = []
        self.code_of: dict[str, int] = {}
        for st in handle.row_group_stats(columns):
            if st.file not in self.code_of:
                self.code_of[st.file] = len(self.file_names)
                self.file_names.append(st.file)
            codes.append(self.code_of[st.file])
            ids.append(st.row_group)
            for c in columns:
                lo, hi, nc = st.ranges.get(c, (None, None, None))
                mins[c].append(lo)
                maxs[c].append(hi)
                nulls[c].append(-1 if nc is None else nc)
        self.codes = np.array(codes, dtype=np.int64)
        self.ids = np.array(ids, dtype=np.int64)
        self.per_file = np.bincount(self.codes, minlength=len(self.file_names))
        self.has: dict[str, np.ndarray] = {}
        self.mins: dict[str, np.ndarray] = {}
        self.maxs: dict[str, np.ndarray] = {}
        for c in columns:
            has = np.array([a is not None and b is not None for a, b in zip(mins[c], maxs[c])],
                           dtype=bool)
            self.has[c] = has
            self.mins[c] = _objects([v for v, h in zip(mins[c], has) if h])
            self.maxs[c] = _objects([v for v, h in zip(maxs[c], has) if h])
        self.nulls = {c: np.array(v, dtype=np.int64) for c, v in nulls.items()}

    def select(self, candidate_files: Sequence[str] | None, wanted: dict[str, tuple[list, bool]]
               ) -> tuple[list[str], list[tuple[int, ...] | None]]:
        """Files and row groups that may hold rows with the wanted values.

        ``wanted`` maps a column to ``(sorted non-null raw values, includes null)``.
        Row groups without statistics are kept.
        """
        keep = np.ones(len(self.ids), dtype=bool)
        if candidate_files is not None:
            codes = [self.code_of[f] for f in candidate_files if f in self.code_of]
            keep &= np.isin(self.codes, np.array(codes, dtype=np.int64))
        for c, (vals, with_null) in wanted.items():
            has = self.has[c]
            ok = ~has  # no statistics: cannot rule the row group out
            if vals and has.any():
                arr = _objects(vals)
                try:
                    left = np.searchsorted(arr, self.mins[c], side="left")
                    right = np.searchsorted(arr, self.maxs[c], side="right")
                    ok[has] = right > left
                except TypeError:  # incomparable statistics: keep everything
                    ok[has] = True
            if with_null:
                ok |= self.nulls[c] != 0
            keep &= ok
        kept = np.flatnonzero(keep)
        files: list[str] = []
        groups: list[tuple[int, ...] | None] = []
        if kept.size == 0:
            return files, groups
        codes = self.codes[kept]
        bounds = np.flatnonzero(np.diff(codes)) + 1
        for chunk in np.split(kept, bounds):
            code = int(self.codes[chunk[0]])
            files.append(self.file_names[code])
            rg = tuple(int(i) for i in self.ids[chunk])
            groups.append(None if len(rg) == self.per_file[code] else rg)
        return files, groups


def _objects(values: Sequence[Any]) -> np.ndarray:
    arr = np.empty(len(values), dtype=object)
    arr[:] = list(values)
    return arr


def plan_tasks(handle: DatasetHandle, spec: JobSpec, strata: Sequence[StratumPlan], *,
               target_rows_per_task: int | None = None,
               columns: Sequence[str] | None = None,
               max_strata_per_task: int = MAX_STRATA_PER_TASK) -> list[Task]:
    """Pack strata into tasks and describe each task's slice.

    Consecutive strata (in the given order) are packed greedily while the task's cost
    (``OVERHEAD_ROWS + nrows`` per stratum) stays within the target and it holds at most
    ``max_strata_per_task`` strata; a stratum above the target goes alone.

    Each descriptor lists only the files whose hive folder values match the task's
    strata (strata columns that are partition columns), and — for the other strata
    columns — only the row groups whose footer min/max statistics can contain one of
    the task's values. The strata predicate is pushed down again when reading.

    Parameters
    ----------
    handle : DatasetHandle
    spec : JobSpec
    strata : sequence of StratumPlan
        From :func:`plan_strata` (possibly a subset, e.g. strata still to do).
    target_rows_per_task : int, optional
        Overrides ``spec.max_task_seconds`` (``seconds * ROWS_PER_SECOND`` rows);
        default :data:`DEFAULT_TARGET_ROWS`, or less so that the strata make at least
        :data:`MIN_TASKS` tasks.
    columns : sequence of str, optional
        Columns to read; default :func:`service.spec.used_columns` (parses the formula).
    max_strata_per_task : int, default :data:`MAX_STRATA_PER_TASK`

    Returns
    -------
    list of Task
        Every stratum in exactly one task, order preserved.
    """
    if not strata:
        return []
    schema = handle.schema
    strata_cols = list(spec.strata)
    cols = tuple(used_columns(spec, schema) if columns is None else columns)
    cols = tuple(dict.fromkeys([*cols, *strata_cols]))
    target = _target_rows(spec, target_rows_per_task, strata)
    groups = _pack(strata, target, max(1, int(max_strata_per_task)))

    part_cols = [c for c in strata_cols if c in handle.partition_columns]
    other_cols = [c for c in strata_cols if c not in handle.partition_columns]

    by_partition: dict[tuple, list[str]] | None = None
    if part_cols:
        by_partition = {}
        for path, values in handle.file_partitions():
            key = tuple(_json_value(values.get(c)) for c in part_cols)
            by_partition.setdefault(key, []).append(path)

    index = None
    if other_cols and (len(handle.files) > 1 or len(groups) > 1):
        index = _RowGroupIndex(handle, other_cols)

    tasks = []
    for group in groups:
        candidate: list[str] | None = None
        if by_partition is not None:
            seen: dict[str, None] = {}
            for s in group:
                for f in by_partition.get(tuple(s.values.get(c) for c in part_cols), ()):
                    seen[f] = None
            candidate = sorted(seen)
        files: list[str] | None = candidate
        row_groups: list[tuple[int, ...] | None] | None = None
        if index is not None:
            wanted = {}
            for c in other_cols:
                raw = {_raw_value(s.values.get(c), schema.field(c).type) for s in group}
                present = [v for v in raw if v is not None]
                try:
                    present.sort()
                except TypeError:
                    present = []
                    wanted = {}
                    break
                wanted[c] = (present, None in raw)
            if wanted:
                files, row_groups = index.select(candidate, wanted)
                if not files:  # statistics disagree with the counts: read everything
                    files, row_groups = candidate, None
        values = tuple(tuple(s.values.get(c) for c in strata_cols) for s in group)
        descriptor = handle.descriptor(
            columns=cols, filters=spec.filters, strata_columns=strata_cols,
            strata_values=values, files=files, row_groups=row_groups,
            files_hold_strata=by_partition is not None and not other_cols,
        )
        keys = [s.key for s in group]
        tasks.append(Task(task_id=_task_id(keys), strata=tuple(group), descriptor=descriptor,
                          est_rows=int(sum(s.nrows for s in group))))
    return tasks
