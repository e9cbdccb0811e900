"""The result tables' SQL: write a batch of prepared results, read a result table back.

Used by :class:`storage.store.Store` (``record_results`` and ``read_table``), which owns
the transactions, the fencing check and the public interface; everything here runs on a
connection inside a transaction the store opened.

Writing a batch
---------------
Per batch (one transaction): delete the strata's previous fits (``ON DELETE CASCADE``
removes their children), insert the new fits, look their ids up, insert the child rows,
update the ledger. Fits and child rows are inserted as positional tuples handed to the
database driver as they are (:func:`insert_rows`): :func:`storage.rows.prepare_results`
has already validated and converted every value to what the driver takes (finite floats
or ``None``, plain ints, bools and strings, JSON as text), so SQLAlchemy's per-row
parameter processing (about half of the coordinator's cost per stratum: ~1,000 bound
values per batch of 20 strata) is skipped. On SQLite that is one ``executemany`` per
table and chunk; on PostgreSQL (psycopg 3) one ``COPY ... FROM STDIN`` per table, in
the same transaction: psycopg's ``executemany`` costs ~9.5 us of client CPU per row (the
40 random-effect rows of a stratum took 0.38 ms), ``COPY`` ~2 us, and the server's time
per row falls too (``record_results`` of the service benchmark's 2,000 strata, local
server, 3 runs each: 0.86-1.09 -> 0.52-0.56 ms of wall time and 0.61-0.63 -> 0.25-0.28 ms
of client CPU per stratum). The statements are built from the table metadata of
:mod:`storage.models` only, never from user strings.
"""
from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any

import pandas as pd
import sqlalchemy as sa
from sqlalchemy import bindparam, delete, select, update

from storage.errors import InvalidRecordError
from storage.models import Coefficient, FiniteFloat, Fit, RandomEffect, Stratum
from storage.models import VarianceComponent
from storage.rows import COEFFICIENT_COLUMNS, FIT_COLUMNS, RANEF_COLUMNS, VARIANCE_COLUMNS
from storage.rows import PreparedResult

__all__ = ["TABLES", "write_results", "read_result_table", "insert_rows", "chunks", "CHUNK"]

_strata: sa.Table = Stratum.__table__  # type: ignore[assignment]
_fits: sa.Table = Fit.__table__  # type: ignore[assignment]
_coefs: sa.Table = Coefficient.__table__  # type: ignore[assignment]
_vcomp: sa.Table = VarianceComponent.__table__  # type: ignore[assignment]
_ranef: sa.Table = RandomEffect.__table__  # type: ignore[assignment]

#: Rows per INSERT statement / keys per IN list.
CHUNK = 1000

# read_result_table: name -> (table, columns shown after "stratum"); children join
# through fits. The child column tuples are also the order of PreparedResult's rows.
_FIT_SHOWN = tuple(c.name for c in _fits.c if c.name not in ("id", "job_id", "stratum_id"))
_STRATA_SHOWN = (
    "values", "nrows", "status", "attempts", "error_class", "error_message", "updated_at",
)
_CHILDREN: dict[str, tuple[sa.Table, tuple[str, ...]]] = {
    "coefficients": (_coefs, COEFFICIENT_COLUMNS),
    "variance": (_vcomp, VARIANCE_COLUMNS),
    "ranef": (_ranef, RANEF_COLUMNS),
}
_FIT_KEYS = ("job_id", "stratum_id", "attempt", "created_at")
#: Valid names for :meth:`storage.store.Store.read_table`.
TABLES: tuple[str, ...] = ("fits", "coefficients", "variance", "ranef", "strata")

_PLACEHOLDERS = {"qmark": "?", "format": "%s", "pyformat": "%s"}


def chunks(items: Sequence[Any], size: int = CHUNK) -> Iterator[Sequence[Any]]:
    """Consecutive slices of ``items`` of at most ``size``."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


@functools.lru_cache(maxsize=64)
def _insert_sql(dialect: sa.Dialect, table: str, columns: tuple[str, ...]) -> str:
    """``INSERT INTO table (columns) VALUES (?, ...)`` in the driver's paramstyle."""
    try:
        mark = _PLACEHOLDERS[dialect.paramstyle]
    except KeyError:  # pragma: no cover - SQLite (qmark) and psycopg (pyformat) only
        raise NotImplementedError(f"paramstyle {dialect.paramstyle!r}") from None
    quote = dialect.identifier_preparer.quote
    return (f"INSERT INTO {quote(table)} ({', '.join(quote(c) for c in columns)}) "
            f"VALUES ({', '.join([mark] * len(columns))})")


@functools.lru_cache(maxsize=64)
def _copy_sql(dialect: sa.Dialect, table: str, columns: tuple[str, ...]) -> str:
    """``COPY table (columns) FROM STDIN`` (PostgreSQL's text format)."""
    quote = dialect.identifier_preparer.quote
    return f"COPY {quote(table)} ({', '.join(quote(c) for c in columns)}) FROM STDIN"


def _copies(conn: sa.Connection) -> bool:
    """Whether rows go in by ``COPY``: PostgreSQL through psycopg 3."""
    return conn.dialect.name == "postgresql" and conn.dialect.driver == "psycopg"


def _copy_rows(conn: sa.Connection, table: str, columns: tuple[str, ...],
               rows: Sequence[tuple[Any, ...]]) -> None:
    """Stream ``rows`` into ``table`` with ``COPY`` on the connection's own transaction.

    psycopg adapts each value as it would a query parameter (text format: ``None`` as
    ``\\N``, tabs, newlines and backslashes escaped). A driver error is raised as the
    SQLAlchemy exception ``executemany`` would have raised (``IntegrityError``,
    ``OperationalError``, ...), and a lost connection is invalidated, so the store's
    error handling and the pool see no difference.
    """
    dialect = conn.dialect
    sql = _copy_sql(dialect, table, columns)
    dbapi_error = dialect.loaded_dbapi.Error
    pooled = conn.connection
    try:
        with pooled.driver_connection.cursor() as cur, cur.copy(sql) as copy:
            write = copy.write_row
            for row in rows:
                write(row)
    except dbapi_error as exc:
        invalidated = dialect.is_disconnect(exc, pooled.dbapi_connection, None)
        if invalidated:
            conn.invalidate(exc)
        raise sa.exc.DBAPIError.instance(
            sql, None, exc, dbapi_error, connection_invalidated=invalidated, dialect=dialect
        ) from exc


def insert_rows(conn: sa.Connection, table: sa.Table, columns: tuple[str, ...],
                rows: Sequence[tuple[Any, ...]]) -> None:
    """Insert positional rows (``COPY`` on PostgreSQL, ``executemany`` elsewhere), values
    passed to the driver as given.

    Parameters
    ----------
    conn : sqlalchemy.Connection
        Inside the caller's transaction.
    table : sqlalchemy.Table
        One of :mod:`storage.models`' tables.
    columns : tuple of str
        Column names of ``table``, in the order of each row's values.
    rows : sequence of tuple
        Values already in driver form (see the module docstring): no type processing
        happens here.
    """
    unknown = [c for c in columns if c not in table.c]
    if unknown:
        raise ValueError(f"table {table.name} has no column(s) {unknown}")
    if _copies(conn):
        _copy_rows(conn, table.name, tuple(columns), rows)
        return
    sql = _insert_sql(conn.dialect, table.name, columns)
    for chunk in chunks(rows):
        conn.exec_driver_sql(sql, list(chunk))


def _bind(conn: sa.Connection, column: sa.Column, value: Any) -> Any:
    """``value`` as SQLAlchemy would bind it to ``column`` on this connection's dialect."""
    process = column.type.bind_processor(conn.dialect)
    return value if process is None else process(value)


def write_results(conn: sa.Connection, job_id: int, attempt: int,
                  prepared: Sequence[PreparedResult], now: datetime) -> None:
    """Replace the fits (and children) of the batch's strata and update their ledger rows.

    Parameters
    ----------
    conn : sqlalchemy.Connection
        In a write transaction that has passed the fencing check.
    job_id, attempt : int
    prepared : sequence of PreparedResult
        From :func:`storage.rows.prepare_results` (one per stratum key).
    now : datetime
        ``fits.created_at`` and ``strata.updated_at``.

    Raises
    ------
    InvalidRecordError
        A result names a stratum not registered for the job (nothing is written: the
        caller's transaction rolls back).
    """
    if not prepared:
        return
    ids = _stratum_ids(conn, job_id, [p.key for p in prepared])
    _delete_fits(conn, list(ids.values()))
    created = _bind(conn, _fits.c.created_at, now)
    fit_rows = [(job_id, ids[p.key], attempt, created, *p.fit)
                for p in prepared if p.fit is not None]
    if fit_rows:
        insert_rows(conn, _fits, _FIT_KEYS + FIT_COLUMNS, fit_rows)
        fit_ids = _fit_ids(conn, [r[1] for r in fit_rows])
        for attr, (table, columns) in _CHILDREN.items():
            rows = [(fit_ids[ids[p.key]], *row) for p in prepared for row in getattr(p, attr)]
            if rows:
                insert_rows(conn, table, ("fit_id", *columns), rows)
    conn.execute(
        update(_strata)
        .where(_strata.c.id == bindparam("b_id"))
        .values(
            status=bindparam("b_status"),
            attempts=_strata.c.attempts + 1,
            error_class=bindparam("b_error_class"),
            error_message=bindparam("b_error_message"),
            updated_at=now,
        ),
        [
            {
                "b_id": ids[p.key],
                "b_status": p.status,
                "b_error_class": p.error_class,
                "b_error_message": p.error_message,
            }
            for p in prepared
        ],
    )


def _stratum_ids(conn: sa.Connection, job_id: int, keys: list[str]) -> dict[str, int]:
    ids: dict[str, int] = {}
    for chunk in chunks(keys):
        rows = conn.execute(
            select(_strata.c.key, _strata.c.id).where(
                _strata.c.job_id == job_id, _strata.c.key.in_(chunk)
            )
        )
        ids.update({r.key: r.id for r in rows})
    missing = [k for k in keys if k not in ids]
    if missing:
        raise InvalidRecordError(
            f"job {job_id}: results for unregistered strata {missing[:5]}"
            + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        )
    return ids


def _fit_ids(conn: sa.Connection, stratum_ids: list[int]) -> dict[int, int]:
    """Stratum id → id of its fit (just inserted: at most one fit per stratum)."""
    out: dict[int, int] = {}
    for chunk in chunks(stratum_ids):
        rows = conn.execute(
            select(_fits.c.stratum_id, _fits.c.id).where(_fits.c.stratum_id.in_(chunk))
        )
        out.update({r.stratum_id: r.id for r in rows})
    return out


def _delete_fits(conn: sa.Connection, stratum_ids: list[int]) -> None:
    """Delete the fits of these strata; ON DELETE CASCADE removes their children."""
    for chunk in chunks(stratum_ids):
        conn.execute(delete(_fits).where(_fits.c.stratum_id.in_(chunk)))


def read_result_table(conn: sa.Connection, job_id: int, table: str) -> pd.DataFrame:
    """One result table of a job (see :meth:`storage.store.Store.read_table`).

    Returns
    -------
    pandas.DataFrame
        Possibly empty; the caller checks that the job exists.

    Raises
    ------
    ValueError
        Unknown ``table``.
    """
    if table not in TABLES:
        raise ValueError(f"unknown table {table!r}; valid: {', '.join(TABLES)}")
    stratum = _strata.c.key.label("stratum")
    if table == "strata":
        source: sa.Table = _strata
        shown = _STRATA_SHOWN
        query = select(stratum, *(_strata.c[c] for c in shown)).where(
            _strata.c.job_id == job_id
        )
    elif table == "fits":
        source, shown = _fits, _FIT_SHOWN
        query = (
            select(stratum, *(_fits.c[c] for c in shown))
            .join_from(_fits, _strata, _fits.c.stratum_id == _strata.c.id)
            .where(_fits.c.job_id == job_id)
        )
    else:
        source, shown = _CHILDREN[table]
        query = (
            select(stratum, *(source.c[c] for c in shown))
            .join_from(source, _fits, source.c.fit_id == _fits.c.id)
            .join(_strata, _fits.c.stratum_id == _strata.c.id)
            .where(_fits.c.job_id == job_id)
        )
    query = query.order_by(_strata.c.key, source.c.id)
    rows = conn.execute(query).all()
    columns = ["stratum", *shown]
    frame = pd.DataFrame([tuple(r) for r in rows], columns=columns)
    for name in shown:
        if isinstance(source.c[name].type, FiniteFloat):
            frame[name] = frame[name].astype("float64")
    # SQL collations differ between backends; sort by code point, stably.
    return frame.sort_values("stratum", kind="stable", ignore_index=True)
