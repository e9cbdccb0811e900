"""Engine construction: URL resolution, JSON serialisation and SQLite connection setup.

SQLite connections get WAL journaling, a busy timeout and foreign keys, and pysqlite's own
transaction handling is switched off so that SQLAlchemy's ``begin`` emits the ``BEGIN``:
a plain (deferred) ``BEGIN`` for reads and ``BEGIN IMMEDIATE`` for connections marked with
the ``stratafit_write`` execution option. Taking the write lock at the start of every
write transaction is what makes a read-then-write (claim a job, check the fencing token)
atomic across processes, and lets the busy timeout apply instead of failing on a lock
upgrade.
"""
from __future__ import annotations

import json
import math
import os
import sqlite3
import time
from datetime import date, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event

__all__ = [
    "DEFAULT_URL",
    "ENV_VAR",
    "SQLITE_BUSY_TIMEOUT_MS",
    "WRITE_OPTION",
    "resolve_url",
    "create_engine",
    "json_dumps",
    "to_python",
]

#: Store used when neither an explicit URL nor ``$STRATAFIT_STORE`` is given.
DEFAULT_URL = "sqlite:///stratafit.db"
#: Environment variable naming the store URL.
ENV_VAR = "STRATAFIT_STORE"
#: How long a SQLite writer waits for the write lock before failing.
SQLITE_BUSY_TIMEOUT_MS = 30_000
#: Execution option marking a connection whose transactions write.
WRITE_OPTION = "stratafit_write"


def resolve_url(url: str | None = None) -> sa.URL:
    """Return the store URL: ``url``, else ``$STRATAFIT_STORE``, else :data:`DEFAULT_URL`.

    A bare ``postgresql://`` URL is given the psycopg (3) driver.

    Parameters
    ----------
    url : str, optional

    Returns
    -------
    sqlalchemy.URL
    """
    u = sa.make_url(url or os.environ.get(ENV_VAR) or DEFAULT_URL)
    if u.drivername in ("postgresql", "postgres"):
        u = u.set(drivername="postgresql+psycopg")
    return u


def to_python(value: Any) -> Any:
    """Convert numpy (and other array-library) scalars to plain Python values.

    Parameters
    ----------
    value : Any

    Returns
    -------
    Any
        ``value.item()`` for zero-dimensional array scalars, else ``value`` unchanged.
    """
    if hasattr(value, "dtype") and hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        return value.item()
    return value


def _json_safe(value: Any) -> Any:
    """Recursively make ``value`` JSON-serialisable; non-finite floats become None."""
    if hasattr(value, "tolist") and hasattr(value, "dtype"):
        value = value.tolist()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {
            (k if isinstance(k, str | int | float | bool) or k is None else str(to_python(k))): (
                _json_safe(v)
            )
            for k, v in value.items()
        }
    if isinstance(value, list | tuple | set | frozenset):
        return [_json_safe(v) for v in value]
    if isinstance(value, datetime | date):
        return value.isoformat()
    return value


def json_dumps(value: Any) -> str:
    """Serialise a JSON column value (NaN/inf → null, numpy → Python, tuples → lists).

    Parameters
    ----------
    value : Any

    Returns
    -------
    str

    Raises
    ------
    TypeError
        If a value cannot be represented in JSON.
    """
    try:  # plain JSON values (the common case): no Python-level walk
        return json.dumps(value, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError):  # NaN/inf, NumPy values, dates, sets, odd keys
        pass
    return json.dumps(_json_safe(value), allow_nan=False, separators=(",", ":"))


def _enable_wal(cursor: sqlite3.Cursor) -> None:
    """Switch the database file to WAL (persistent), retrying while it is locked.

    Changing the journal mode needs an exclusive lock and SQLite reports SQLITE_BUSY at
    once (without the busy handler) when another connection holds a lock, which happens
    when several processes open a fresh database together.
    """
    if cursor.execute("PRAGMA journal_mode").fetchone()[0].lower() in ("wal", "memory"):
        return
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            cursor.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def _sqlite_on_connect(dbapi_connection: Any, connection_record: Any) -> None:
    # Let SQLAlchemy's "begin" listener emit BEGIN; pysqlite must not do it implicitly.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS:d}")
        _enable_wal(cursor)
        cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.execute("PRAGMA foreign_keys = ON")
    finally:
        cursor.close()


def _sqlite_on_begin(conn: sa.Connection) -> None:
    write = conn.get_execution_options().get(WRITE_OPTION, False)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


def create_engine(url: sa.URL) -> sa.Engine:
    """Create the engine for a store URL (SQLite or PostgreSQL).

    Parameters
    ----------
    url : sqlalchemy.URL
        From :func:`resolve_url`.

    Returns
    -------
    sqlalchemy.Engine
    """
    kwargs: dict[str, Any] = {"json_serializer": json_dumps}
    if url.get_backend_name() == "sqlite":
        if url.database in (None, "", ":memory:"):
            kwargs["poolclass"] = sa.StaticPool
            kwargs["connect_args"] = {"check_same_thread": False}
        engine = sa.create_engine(url, **kwargs)
        event.listen(engine, "connect", _sqlite_on_connect)
        event.listen(engine, "begin", _sqlite_on_begin)
        return engine
    return sa.create_engine(url, pool_pre_ping=True, **kwargs)
