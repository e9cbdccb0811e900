"""Programmatic Alembic configuration (no ``alembic.ini``, no dependency on the CWD).

:meth:`storage.store.Store.upgrade` is the normal entry point; these helpers exist for it
and for tests (single head, migrations equal the models).
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Connection, func, inspect, select, text

from storage.errors import MigrationError
from storage.models import metadata

if TYPE_CHECKING:
    from alembic.config import Config

__all__ = ["HEAD_REVISION", "MIGRATIONS_DIR", "PG_MIGRATION_LOCK", "alembic_config",
           "current_revision", "heads", "run_migrations", "upgrade_head"]

#: The revision id of the newest migration (``migrations/versions``), written down so
#: that opening a store already at head needs no Alembic at all (importing Alembic takes
#: ~0.15 s of every command's start-up). A test checks it against Alembic's own head:
#: adding a migration means updating it.
HEAD_REVISION = "0001"

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
    from alembic.config import Config

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
    from alembic.script import ScriptDirectory

    return tuple(ScriptDirectory.from_config(alembic_config()).get_heads())


def current_revision(connection: Connection) -> str | None:
    """The revision the database is stamped with, ``None`` without ``alembic_version``.

    Parameters
    ----------
    connection : sqlalchemy.Connection

    Returns
    -------
    str or None
        ``None`` also when the table holds no row or several (a branched history).
    """
    if not inspect(connection).has_table("alembic_version"):
        return None
    rows = connection.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
    return rows[0] if len(rows) == 1 else None


def upgrade_head(connection: Connection) -> None:
    """Upgrade the database behind ``connection`` to the head revision.

    A new database (none of the tables, no ``alembic_version``) gets the models' schema
    stamped at head; one stamped at :data:`HEAD_REVISION` is left alone; anything else
    goes through Alembic's migrations (:func:`run_migrations`). Only that last case
    imports Alembic.

    Runs inside the connection's current transaction (the caller commits). On PostgreSQL
    a transaction-scoped advisory lock is taken first, so concurrent callers wait for
    each other and the later ones find the schema already at head (a no-op). On SQLite the
    caller's ``BEGIN IMMEDIATE`` transaction serialises them. Within one process, runs are
    also serialised by a lock, because Alembic keeps its migration context in a global.

    Parameters
    ----------
    connection : sqlalchemy.Connection
        A connection with an open transaction.

    Raises
    ------
    storage.errors.MigrationError
        Alembic could not upgrade (e.g. the database is stamped with an unknown revision).
    """
    with _PROCESS_LOCK:
        if connection.dialect.name == "postgresql":
            connection.execute(select(func.pg_advisory_xact_lock(PG_MIGRATION_LOCK)))
        names = set(inspect(connection).get_table_names())
        if "alembic_version" not in names and not names & set(metadata.tables):
            _create_at_head(connection)  # a new database: no Alembic to import
            return
        if current_revision(connection) == HEAD_REVISION:
            return  # at head: nothing to run
        run_migrations(connection)


def run_migrations(connection: Connection) -> None:
    """Run Alembic's migrations up to head on ``connection`` (in its transaction).

    :func:`upgrade_head` calls this for a database that is neither new nor at head; the
    tests call it to check the migration scripts themselves.

    Raises
    ------
    storage.errors.MigrationError
        Alembic could not upgrade (e.g. an unknown revision).
    """
    from alembic import command
    from alembic.util import CommandError

    try:
        command.upgrade(alembic_config(connection=connection), "head")
    except CommandError as exc:
        raise MigrationError(str(exc)) from exc


def _create_at_head(connection: Connection) -> None:
    """Create the models' schema and stamp it with :data:`HEAD_REVISION`.

    Alembic's documented way of starting a new database ("create_all, then stamp head"):
    the same tables, constraints and indexes as running every migration (the tests
    compare both with the models and with each other), and Alembic manages the result
    like any migrated database.
    """
    metadata.create_all(connection)
    # the table Alembic itself creates (same name, column and primary-key constraint)
    connection.execute(text(
        "CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL, "
        "CONSTRAINT alembic_version_pkc PRIMARY KEY (version_num))"
    ))
    connection.execute(text("INSERT INTO alembic_version (version_num) VALUES (:v)"),
                       {"v": HEAD_REVISION})
