"""Programmatic Alembic configuration (no ``alembic.ini``, no dependency on the CWD).

:meth:`storage.store.Store.upgrade` is the normal entry point; these helpers exist for it
and for tests (single head, migrations equal the models).
"""
from __future__ import annotations

import threading
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, func, select

__all__ = ["MIGRATIONS_DIR", "PG_MIGRATION_LOCK", "alembic_config", "heads", "upgrade_head"]

#: The Alembic script directory, located from this package (not the working directory).
MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
#: Key of the PostgreSQL advisory lock that serialises concurrent upgrades.
PG_MIGRATION_LOCK = 0x5354_5246  # "STRF"
# Alembic's ``context`` is a module-level proxy: one migration run per process at a time.
_PROCESS_LOCK = threading.Lock()


def alembic_config(url: str | None = None, connection: Connection | None = None) -> Config:
    """Return an Alembic :class:`~alembic.config.Config` for stratafit's migrations.

    Parameters
    ----------
    url : str, optional
        Database URL (``sqlalchemy.url``), used when no ``connection`` is given (e.g. for
        offline SQL generation or ``alembic.command.revision``).
    connection : sqlalchemy.Connection, optional
        An open connection the migrations run on (inside the caller's transaction).

    Returns
    -------
    alembic.config.Config
    """
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url is not None:
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def heads() -> tuple[str, ...]:
    """Return the revision ids of the migration heads (exactly one is expected).

    Returns
    -------
    tuple of str
    """
    return tuple(ScriptDirectory.from_config(alembic_config()).get_heads())


def upgrade_head(connection: Connection) -> None:
    """Upgrade the database behind ``connection`` to the head revision.

    Runs inside the connection's current transaction (the caller commits). On PostgreSQL
    a transaction-scoped advisory lock is taken first, so concurrent callers wait for
    each other and the later ones find the schema already at head (a no-op). On SQLite the
    caller's ``BEGIN IMMEDIATE`` transaction serialises them. Within one process, runs are
    also serialised by a lock, because Alembic keeps its migration context in a global.

    Parameters
    ----------
    connection : sqlalchemy.Connection
        A connection with an open transaction.
    """
    with _PROCESS_LOCK:
        if connection.dialect.name == "postgresql":
            connection.execute(select(func.pg_advisory_xact_lock(PG_MIGRATION_LOCK)))
        command.upgrade(alembic_config(connection=connection), "head")
