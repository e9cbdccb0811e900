"""Migrations: one head, applied migrations equal the models, upgrades are idempotent."""
from __future__ import annotations

import multiprocessing
import subprocess
import sys
import threading

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from storage import Store, StorageError
from storage.migrate import (HEAD_REVISION, alembic_config, current_revision, heads,
                             run_migrations)
from storage.models import metadata

TABLES = {"jobs", "strata", "fits", "coefficients", "variance_components", "random_effects"}


# fork is fast; the parent holds no open connections when it forks (stores are disposed).
MP_START = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"

def _diffs(url: str) -> list:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True})
            return compare_metadata(ctx, metadata)
    finally:
        engine.dispose()


def _tables(url: str) -> set[str]:
    engine = sa.create_engine(url)
    try:
        return set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_single_head():
    assert len(heads()) == 1


def test_head_revision_constant_is_alembic_head():
    # the fast path of upgrade() trusts HEAD_REVISION: a new migration must update it
    assert heads() == (HEAD_REVISION,)


def _alembic_imported(url: str) -> bool:
    """Whether a fresh process imports Alembic to open, upgrade and use the store at ``url``."""
    code = (
        "import sys\n"
        "from storage import Store\n"
        f"s = Store({url!r}); s.upgrade(); s.submit_job(name='j', spec={{}}, spec_hash='h')\n"
        "print('alembic' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    return out.stdout.strip() != "False"


def test_store_at_head_opens_without_alembic(tmp_path):
    url = f"sqlite:///{tmp_path / 'h.db'}"
    with Store(url) as store:
        store.upgrade()
    assert not _alembic_imported(url)


def test_unknown_revision_is_a_storage_error(store_url):
    with Store(store_url) as store:
        store.upgrade()
    engine = sa.create_engine(store_url)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = '9999'"))
        assert current_revision(conn) == "9999"
    engine.dispose()
    with Store(store_url) as store, pytest.raises(StorageError, match="upgrade failed.*9999"):
        store.upgrade()


def _migrate(url: str) -> None:
    """Alembic's migrations themselves (Store.upgrade creates a new database directly)."""
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            run_migrations(conn)
    finally:
        engine.dispose()


def _revision(url: str) -> str | None:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return current_revision(conn)
    finally:
        engine.dispose()


def test_migrations_match_models(store_url):
    _migrate(store_url)
    assert _diffs(store_url) == []
    assert _tables(store_url) == TABLES | {"alembic_version"}
    assert _revision(store_url) == HEAD_REVISION


def test_new_database_is_created_at_head(store_url):
    with Store(store_url) as store:
        store.upgrade()
    assert _diffs(store_url) == []
    assert _tables(store_url) == TABLES | {"alembic_version"}
    assert _revision(store_url) == HEAD_REVISION
    # Alembic manages it like a migrated one: down to base and up again by the scripts
    engine = sa.create_engine(store_url)
    with engine.begin() as conn:
        command.downgrade(alembic_config(connection=conn), "base")
    engine.dispose()
    assert _tables(store_url) <= {"alembic_version"}
    _migrate(store_url)
    assert _diffs(store_url) == [] and _revision(store_url) == HEAD_REVISION


def test_created_and_migrated_schemas_agree(tmp_path):
    """The same tables, columns, constraints and indexes either way (SQLite DDL)."""
    import re

    def items(sql: str) -> list[str]:
        """A CREATE statement as its head and the sorted top-level items of its body."""
        sql = re.sub(r"\s+", " ", sql)
        sql = re.sub(r"\( ", "(", re.sub(r" \)", ")", sql))
        if not sql.startswith("CREATE TABLE"):
            return [sql]
        head, body = sql[:sql.index("(")].strip(), sql[sql.index("(") + 1:sql.rindex(")")]
        parts, depth, start = [], 0, 0
        for i, ch in enumerate(body):
            depth += {"(": 1, ")": -1}.get(ch, 0)
            if ch == "," and depth == 0:
                parts.append(body[start:i].strip())
                start = i + 1
        parts.append(body[start:].strip())
        return [head, *sorted(parts)]

    def ddl(url: str) -> dict[str, list[str]]:
        engine = sa.create_engine(url)
        try:
            with engine.connect() as conn:
                rows = conn.execute(sa.text(
                    "SELECT name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'"))
                return {name: items(sql or "") for name, sql in rows}
        finally:
            engine.dispose()

    created, migrated = f"sqlite:///{tmp_path / 'c.db'}", f"sqlite:///{tmp_path / 'm.db'}"
    with Store(created) as store:
        store.upgrade()
    _migrate(migrated)
    got, want = ddl(created), ddl(migrated)
    assert len(want) == len(TABLES) + 1 + 4 and len(want["strata"]) > 10  # tables, indexes
    assert got == want


def test_new_database_is_created_without_alembic(tmp_path):
    assert not _alembic_imported(f"sqlite:///{tmp_path / 'n.db'}")


def test_upgrade_is_idempotent(store_url):
    with Store(store_url) as store:
        store.upgrade()
        job, _ = store.submit_job(name="j", spec={}, spec_hash="h")
        store.upgrade()
        assert store.get_job(job.id).name == "j"


def test_downgrade_then_upgrade(store_url):
    with Store(store_url) as store:
        store.upgrade()
    engine = sa.create_engine(store_url)
    with engine.begin() as conn:
        command.downgrade(alembic_config(connection=conn), "base")
    engine.dispose()
    assert _tables(store_url) <= {"alembic_version"}
    with Store(store_url) as store:
        store.upgrade()
    assert _diffs(store_url) == []


def test_every_foreign_key_is_indexed():
    for table in metadata.tables.values():
        leading = {idx.columns[0].name for idx in table.indexes}
        leading |= {
            c.columns[0].name for c in table.constraints if isinstance(c, sa.UniqueConstraint)
        }
        for fk in table.foreign_keys:
            assert fk.parent.name in leading, f"{table.name}.{fk.parent.name} not indexed"


def _upgrade(url: str) -> str:
    with Store(url) as store:
        store.upgrade()
    return "ok"


@pytest.mark.slow
def test_concurrent_upgrades_from_processes(store_url):
    ctx = multiprocessing.get_context(MP_START)
    with ctx.Pool(3) as pool:
        assert pool.map(_upgrade, [store_url] * 3) == ["ok"] * 3
    assert _diffs(store_url) == []


def test_concurrent_upgrades_from_threads(store_url):
    stores = [Store(store_url) for _ in range(4)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(stores))

    def run(store: Store) -> None:
        barrier.wait()
        try:
            store.upgrade()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in stores:
        s.dispose()
    assert errors == []
    assert _diffs(store_url) == []
