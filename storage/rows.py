"""Validate :class:`~storage.records.StratumResult` records and turn them into table rows.

Pure functions (no database access): everything a result could get wrong is caught here,
before a write transaction starts, and reported as
:class:`~storage.errors.InvalidRecordError` naming the stratum and the culprit (table,
row and column).

The child tables of a result (coefficients, variance components, conditional modes) come
as rows or as columns (see :class:`~storage.records.StratumResult`) and are checked a
column at a time: the value types of a column in one pass in C, the finiteness of a float
column with one ``sum`` (or ``np.isfinite`` for an array), and a value-by-value
conversion only for a column that fails those checks. On the columnar form the service
ships, that is a few calls per column instead of a Python call per value.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np

from storage.engine import json_dumps, to_python
from storage.errors import InvalidRecordError
from storage.records import StratumPlan, StratumResult
from storage.states import FITTED_STATUSES, StratumStatus, next_stratum_status

__all__ = [
    "FIT_COLUMNS",
    "COEFFICIENT_COLUMNS",
    "VARIANCE_COLUMNS",
    "RANEF_COLUMNS",
    "ERROR_CLASS_MAX",
    "PreparedResult",
    "prepare_results",
    "strata_rows",
]

#: Keys a result's ``fit`` dict may carry (missing keys are stored as NULL).
FIT_COLUMNS: tuple[str, ...] = (
    "nobs", "ngroups", "loglik", "aic", "bic", "deviance", "converged", "singular",
    "max_grad", "evaluations", "elapsed", "warnings", "optinfo", "formula", "family",
    "link", "method", "reml", "sigma", "hessian_pd",
)
#: Keys of a coefficient row (``term`` required).
COEFFICIENT_COLUMNS: tuple[str, ...] = (
    "term", "estimate", "std_error", "statistic", "p_value", "conf_low", "conf_high",
)
#: Keys of a variance-component row (``grp`` required; ``term2`` None for a variance).
VARIANCE_COLUMNS: tuple[str, ...] = ("grp", "term1", "term2", "variance", "sd", "correlation")
#: Keys of a random-effect row (``grp``, ``level``, ``term`` required).
RANEF_COLUMNS: tuple[str, ...] = ("grp", "level", "term", "mode", "cond_sd")
#: Longest stored ``error_class`` (longer names are truncated).
ERROR_CLASS_MAX = 255

_INT_COLUMNS = frozenset({"nobs", "evaluations", "nrows"})
_BOOL_COLUMNS = frozenset({"converged", "singular", "reml", "hessian_pd"})
_TEXT_COLUMNS = frozenset(
    {"formula", "family", "link", "method", "term", "grp", "level", "term1", "term2"}
)
_JSON_COLUMNS = frozenset({"ngroups", "warnings", "optinfo"})


@dataclass(frozen=True)
class PreparedResult:
    """A validated result: the ledger update plus fit and child rows (without ids).

    Rows are tuples in the order of :data:`FIT_COLUMNS`, :data:`COEFFICIENT_COLUMNS`,
    :data:`VARIANCE_COLUMNS` and :data:`RANEF_COLUMNS`, with values the database
    driver takes as they are: ``None``, ``int``, ``bool``, ``str``, finite ``float``
    (NaN and ±inf already ``None``) and, in JSON columns, the serialised JSON text.
    """

    key: str
    status: str
    fit: tuple[Any, ...] | None
    coefficients: list[tuple[Any, ...]]
    variance: list[tuple[Any, ...]]
    ranef: list[tuple[Any, ...]]
    error_class: str | None
    error_message: str | None


class _Bad(ValueError):
    """Internal: a value a column cannot take (the caller adds where it was)."""


def _check_json(value: Any, where: str) -> Any:
    """Fail here, naming the culprit, rather than mid-transaction."""
    try:
        json_dumps(value)
    except (TypeError, ValueError) as exc:
        raise InvalidRecordError(f"{where}: not JSON-serialisable: {exc}") from None
    return value


def _to_float(value: Any) -> float | None:
    if type(value) is float:  # the common case: no call
        return value if value - value == 0.0 else None  # NaN/inf → None
    value = to_python(value)
    if value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError) as exc:
        raise _Bad(str(exc)) from None
    return value if math.isfinite(value) else None


def _to_int(value: Any) -> int | None:
    if type(value) is int:
        return value
    value = to_python(value)
    if value is None:
        return None
    if isinstance(value, float) and not value.is_integer():
        raise _Bad(f"{value!r} is not an integer")
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise _Bad(str(exc)) from None


def _to_bool(value: Any) -> bool | None:
    if type(value) is bool:
        return value
    value = to_python(value)
    return None if value is None else bool(value)


def _to_text(value: Any) -> str | None:
    if type(value) is str:
        return value
    value = to_python(value)
    return None if value is None else str(value)


def _to_json(value: Any) -> str | None:
    value = to_python(value)
    if value is None:
        return None
    try:
        return json_dumps(value)
    except (TypeError, ValueError) as exc:
        raise _Bad(f"not JSON-serialisable: {exc}") from None


def _converter(column: str) -> Callable[[Any], Any]:
    if column in _JSON_COLUMNS:
        return _to_json
    if column in _INT_COLUMNS:
        return _to_int
    if column in _BOOL_COLUMNS:
        return _to_bool
    if column in _TEXT_COLUMNS:
        return _to_text
    return _to_float


def _convert(column: str, value: Any, where: str) -> Any:
    """One value of ``column`` in driver form; :class:`InvalidRecordError` otherwise."""
    try:
        return _converter(column)(value)
    except _Bad as exc:
        raise InvalidRecordError(f"{where}: column {column!r}: {exc}") from None


@dataclass(frozen=True)
class _Layout:
    """Columns of one row kind, their converters and the required ones (positions)."""

    columns: tuple[str, ...]
    converters: tuple[Callable[[Any], Any], ...]
    column_converters: tuple[Callable[[Any], list], ...]
    required: tuple[int, ...]
    known: frozenset[str]

    @classmethod
    def of(cls, columns: Sequence[str], required: Sequence[str]) -> _Layout:
        columns = tuple(columns)
        return cls(columns, tuple(_converter(c) for c in columns),
                   tuple(_column_converter(c) for c in columns),
                   tuple(columns.index(c) for c in required), frozenset(columns))


def _row(data: Any, layout: _Layout, where: Callable[[], str]) -> tuple[Any, ...]:
    """``data`` (a dict) as a tuple in ``layout.columns`` order, validated and converted.

    ``where`` builds the culprit's name only when there is an error to report.
    """
    if not isinstance(data, Mapping):
        raise InvalidRecordError(f"{where()}: expected a dict, got {type(data).__name__}")
    if not layout.known.issuperset(data):
        unknown = sorted(set(data) - layout.known)
        raise InvalidRecordError(
            f"{where()}: unknown column(s) {unknown}; valid: {', '.join(layout.columns)}"
        )
    get = data.get
    try:
        row = tuple(
            [conv(get(column)) for column, conv in zip(layout.columns, layout.converters)]
        )
    except _Bad as exc:
        bad = next(c for c, conv in zip(layout.columns, layout.converters)
                   if not _converts(conv, get(c)))
        raise InvalidRecordError(f"{where()}: column {bad!r}: {exc}") from None
    missing = [layout.columns[i] for i in layout.required if row[i] is None]
    if missing:
        raise InvalidRecordError(f"{where()}: missing required column(s) {missing}")
    return row


def _converts(conv: Callable[[Any], Any], value: Any) -> bool:
    try:
        conv(value)
    except _Bad:
        return False
    return True


# ------------------------------------------------------------ child tables, by column
#
# A child table (coefficients, variance, ranef) is validated column by column: one
# check of the value types of a whole column (``set(map(type, column))``, in C), one
# finiteness check of a float column (``sum`` of Python floats, or ``np.isfinite`` of
# an array) and a per-value conversion only for a column that fails the quick check
# (NumPy scalars, strings of digits, NaN, a wrong value to report). The rows handed to
# the driver are then ``zip(*columns)``.

_NONE_TYPE = type(None)
_FLOAT_TYPES = frozenset({float})
_FLOAT_OR_NONE_TYPES = frozenset({float, _NONE_TYPE})
_TEXT_TYPES = frozenset({str, _NONE_TYPE})


class _BadAt(ValueError):
    """Internal: ``values[position]`` cannot be converted (message in ``args[0]``)."""

    def __init__(self, position: int, message: str) -> None:
        super().__init__(message)
        self.position = position


def _each(conv: Callable[[Any], Any]) -> Callable[[Any], list]:
    """Per-value column conversion with ``conv``; :class:`_BadAt` names the position."""

    def convert(values: Any) -> list:
        out = []
        append = out.append
        for i, value in enumerate(values):
            try:
                append(conv(value))
            except _Bad as exc:
                raise _BadAt(i, str(exc)) from None
        return out

    return convert


_floats_each = _each(_to_float)


def _float_column(values: Any) -> list:
    """A float column in driver form: finite Python floats, NaN/inf/None as ``None``."""
    if isinstance(values, np.ndarray) and values.ndim == 1 and values.dtype.kind in "fiub":
        arr = values.astype(np.float64, copy=False)
        out = arr.tolist()
        if not np.isfinite(arr).all():
            out = [v if v - v == 0.0 else None for v in out]
        return out
    out = values if type(values) is list else list(values)
    kinds = set(map(type, out))
    if kinds <= _FLOAT_TYPES:
        total = sum(out)
        if total - total == 0.0:  # all finite (an overflowing sum takes the next line)
            return out
        return [v if v - v == 0.0 else None for v in out]
    if kinds <= _FLOAT_OR_NONE_TYPES:
        return [None if v is None or v - v != 0.0 else v for v in out]
    return _floats_each(out)


def _text_column(values: Any) -> list:
    """A text column in driver form: ``str`` or ``None``."""
    if isinstance(values, np.ndarray):
        values = values.tolist()
    out = values if type(values) is list else list(values)
    if set(map(type, out)) <= _TEXT_TYPES:
        return out
    return [_to_text(v) for v in out]


def _column_converter(column: str) -> Callable[[Any], list]:
    if column in _TEXT_COLUMNS:
        return _text_column
    if column in _JSON_COLUMNS or column in _INT_COLUMNS or column in _BOOL_COLUMNS:
        return _each(_converter(column))
    return _float_column


_FIT = _Layout.of(FIT_COLUMNS, ())
_COEF = _Layout.of(COEFFICIENT_COLUMNS, ("term",))
_VAR = _Layout.of(VARIANCE_COLUMNS, ("grp",))
_RANEF = _Layout.of(RANEF_COLUMNS, ("grp", "level", "term"))


def _nrows(table: Any) -> int:
    """Rows of a child table given as rows (a sequence of dicts) or as columns (a dict);
    1 for anything else (not empty: :func:`_rows` then says what is wrong with it)."""
    if table is None:
        return 0
    if isinstance(table, Mapping):
        return max((len(v) if hasattr(v, "__len__") else 1
                    for v in table.values() if v is not None), default=0)
    return len(table) if hasattr(table, "__len__") else 1


def _columns_of_rows(items: Any, layout: _Layout, where: str, what: str) -> dict[str, list]:
    """Rows (a sequence of dicts) → ``{column: values}``, each row checked for its keys."""
    if isinstance(items, (str, bytes)) or not isinstance(items, Sequence):
        raise InvalidRecordError(
            f"{where} {what}: expected a list of dicts or a dict of columns, "
            f"got {type(items).__name__}"
        )
    known = layout.known
    for i, row in enumerate(items):
        if type(row) is not dict and not isinstance(row, Mapping):
            raise InvalidRecordError(
                f"{where} {what}[{i}]: expected a dict, got {type(row).__name__}"
            )
        if not known.issuperset(row):
            unknown = sorted(set(row) - known)
            raise InvalidRecordError(
                f"{where} {what}[{i}]: unknown column(s) {unknown}; "
                f"valid: {', '.join(layout.columns)}"
            )
    return {c: [row.get(c) for row in items] for c in layout.columns}


def _checked_columns(table: Mapping, layout: _Layout, where: str, what: str
                     ) -> tuple[Mapping[str, Any], int]:
    """Columns given as a dict: known names, sequences of one length."""
    if not layout.known.issuperset(table):
        unknown = sorted(set(table) - layout.known)
        raise InvalidRecordError(
            f"{where} {what}: unknown column(s) {unknown}; valid: {', '.join(layout.columns)}"
        )
    n = None
    first = ""
    for column, values in table.items():
        if type(values) is list:  # the common case: no further checks
            length = len(values)
            if n is None:
                n, first = length, column
            elif length != n:
                raise InvalidRecordError(
                    f"{where} {what}: column {column!r} has {length} values, "
                    f"column {first!r} has {n}"
                )
            continue
        if values is None:
            continue
        if isinstance(values, (str, bytes, Mapping)) or not hasattr(values, "__len__"):
            raise InvalidRecordError(
                f"{where} {what}: column {column!r}: expected a list or 1-d array of "
                f"values, got {type(values).__name__}"
            )
        if isinstance(values, np.ndarray) and values.ndim != 1:
            raise InvalidRecordError(
                f"{where} {what}: column {column!r}: expected a 1-d array, got "
                f"{values.ndim} dimensions"
            )
        if n is None:
            n, first = len(values), column
        elif len(values) != n:
            raise InvalidRecordError(
                f"{where} {what}: column {column!r} has {len(values)} values, "
                f"column {first!r} has {n}"
            )
    return table, n or 0


def _rows(items: Any, layout: _Layout, where: str, what: str) -> list[tuple[Any, ...]]:
    """A child table (rows or columns, see :class:`~storage.records.StratumResult`) as
    driver-ready tuples in ``layout.columns`` order."""
    if type(items) is dict or isinstance(items, Mapping):
        columns, n = _checked_columns(items, layout, where, what)
    else:
        n = len(items) if isinstance(items, Sequence) else -1
        columns = _columns_of_rows(items, layout, where, what)
    if n == 0:
        return []
    converted: list[list] = []
    for column, convert in zip(layout.columns, layout.column_converters):
        values = columns.get(column)
        if values is None:
            converted.append([None] * n)
            continue
        try:
            converted.append(convert(values))
        except _BadAt as exc:
            raise InvalidRecordError(
                f"{where} {what}[{exc.position}]: column {column!r}: {exc}"
            ) from None
    for i in layout.required:
        if None in converted[i]:
            at = min(converted[j].index(None) for j in layout.required if None in converted[j])
            missing = [layout.columns[j] for j in layout.required if converted[j][at] is None]
            raise InvalidRecordError(
                f"{where} {what}[{at}]: missing required column(s) {missing}"
            )
    return list(zip(*converted))


def _prepare(result: StratumResult, store_random_effects: bool) -> PreparedResult:
    where = f"stratum {result.key!r}"
    try:
        status = next_stratum_status(StratumStatus.PENDING, result.status).value
    except ValueError as exc:  # InvalidTransition is a ValueError too
        raise InvalidRecordError(f"{where}: {exc}") from None
    fitted = status in FITTED_STATUSES
    if fitted and result.fit is None:
        raise InvalidRecordError(f"{where}: status {status!r} needs a 'fit' dict")
    if not fitted and (result.fit is not None or _nrows(result.coefficients)
                       or _nrows(result.variance) or _nrows(result.ranef)):
        raise InvalidRecordError(f"{where}: a 'failed' result carries no estimates")
    fit = _row(result.fit, _FIT, lambda: f"{where} fit") if fitted else None
    coefs = _rows(result.coefficients, _COEF, where, "coefficients")
    variance = _rows(result.variance, _VAR, where, "variance")
    ranef = _rows(result.ranef, _RANEF, where, "ranef") if store_random_effects else []
    error_class = result.error_class
    if error_class is not None:
        error_class = str(error_class)[:ERROR_CLASS_MAX]
    error_message = None if result.error_message is None else str(result.error_message)
    return PreparedResult(
        result.key, status, fit, coefs, variance, ranef, error_class, error_message
    )


def prepare_results(
    results: Sequence[StratumResult], *, store_random_effects: bool = True
) -> list[PreparedResult]:
    """Validate results and convert them to rows; a repeated key keeps its last result.

    Parameters
    ----------
    results : sequence of StratumResult
    store_random_effects : bool, default True
        If False, random-effect rows are dropped.

    Returns
    -------
    list of PreparedResult
        In input order of each key's last occurrence.

    Raises
    ------
    InvalidRecordError
        If any result breaks the contract of :class:`~storage.records.StratumResult`.
    """
    last: dict[str, PreparedResult] = {}
    for result in results:
        if not isinstance(result, StratumResult):
            raise InvalidRecordError(
                f"expected StratumResult, got {type(result).__name__}"
            )
        prepared = _prepare(result, store_random_effects)
        last.pop(prepared.key, None)
        last[prepared.key] = prepared
    return list(last.values())


def strata_rows(job_id: int, plans: Sequence[StratumPlan], now: datetime) -> list[dict[str, Any]]:
    """Return ``strata`` ledger rows (status ``pending``) for planned strata.

    Parameters
    ----------
    job_id : int
    plans : sequence of StratumPlan
    now : datetime
        The ``updated_at`` timestamp.

    Returns
    -------
    list of dict

    Raises
    ------
    InvalidRecordError
        If a plan's ``values`` are not JSON-serialisable or ``nrows`` is not an integer.
    """
    rows = []
    for plan in plans:
        where = f"stratum {plan.key!r}"
        rows.append(
            {
                "job_id": job_id,
                "key": str(plan.key),
                "values": _check_json(plan.values, f"{where}: values"),
                "nrows": _convert("nrows", plan.nrows, where),
                "status": StratumStatus.PENDING.value,
                "attempts": 0,
                "updated_at": now,
            }
        )
    return rows
