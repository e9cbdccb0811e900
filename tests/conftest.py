"""Shared database fixtures.

``sqlite_url``
    A SQLite file in ``tmp_path``.
``pg_url``
    A fresh PostgreSQL database ``stratafit_t_<uuid8>`` created on the server named by
    ``$STRATAFIT_TEST_PG`` (default ``postgresql://postgres@127.0.0.1:5432/test``) and
    dropped afterwards. Skipped only when ``STRATAFIT_SKIP_PG=1``; otherwise a server
    that cannot be reached is a test error, not a skip.
``store_url``
    Parametrised over both (ids ``sqlite`` and ``postgres``; the latter marked
    ``postgres``).
``store``
    A migrated :class:`storage.Store` on ``store_url``, disposed afterwards.
"""
from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

PG_ADMIN_URL = os.environ.get("STRATAFIT_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


def _pg_admin(statement: str, name: str) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=10) as conn:
        conn.execute(sql.SQL(statement).format(sql.Identifier(name)))


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """URL of a SQLite database file in the test's temporary directory."""
    return f"sqlite:///{tmp_path / 'stratafit.db'}"


@pytest.fixture
def pg_url() -> Iterator[str]:
    """URL of a fresh PostgreSQL database, dropped after the test."""
    if os.environ.get("STRATAFIT_SKIP_PG") == "1":
        pytest.skip("STRATAFIT_SKIP_PG=1")
    name = f"stratafit_t_{uuid.uuid4().hex[:8]}"
    _pg_admin("CREATE DATABASE {}", name)
    parts = urlsplit(PG_ADMIN_URL)
    yield urlunsplit(parts._replace(scheme="postgresql+psycopg", path=f"/{name}"))
    _pg_admin("DROP DATABASE IF EXISTS {} WITH (FORCE)", name)


@pytest.fixture(
    params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)],
)
def store_url(request: pytest.FixtureRequest) -> str:
    """URL of an empty database on each backend."""
    return request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")


@pytest.fixture
def store(store_url: str) -> Iterator["storage.Store"]:  # noqa: F821
    """A :class:`storage.Store` on ``store_url`` with the schema migrated to head."""
    from storage import Store

    s = Store(store_url)
    s.upgrade()
    yield s
    s.dispose()
