"""Engine setup: URL resolution, JSON serialisation, SQLite pragmas."""
from __future__ import annotations

import json

import numpy as np
import pytest
import sqlalchemy as sa

from storage import Store
from storage.engine import DEFAULT_URL, ENV_VAR, json_dumps, resolve_url


def test_url_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert resolve_url().render_as_string() == DEFAULT_URL
    monkeypatch.setenv(ENV_VAR, f"sqlite:///{tmp_path}/env.db")
    assert Store().url == f"sqlite:///{tmp_path}/env.db"
    assert Store("sqlite:///x.db").url == "sqlite:///x.db"  # explicit wins
    pg = resolve_url("postgresql://u:secret@h:5432/db")
    assert pg.drivername == "postgresql+psycopg"
    assert "secret" not in repr(Store("postgresql://u:secret@h:5432/db"))


def test_json_dumps_is_strict_json():
    value = {"a": float("nan"), "b": (1, float("inf")), "c": np.array([1.5, np.nan]),
             "d": np.int64(3), np.int64(4): np.bool_(True), "e": {"f": [np.float32(0.5)]}}
    text = json_dumps(value)
    assert json.loads(text) == {"a": None, "b": [1, None], "c": [1.5, None], "d": 3,
                                "4": True, "e": {"f": [0.5]}}
    with pytest.raises(TypeError):
        json_dumps({"x": object()})


def test_sqlite_connection_settings(sqlite_url):
    with Store(sqlite_url) as store:
        store.upgrade()
        engine = store._engine  # the store's own connections carry the pragmas
        with engine.connect() as conn:
            pragma = lambda name: conn.exec_driver_sql(f"PRAGMA {name}").scalar()  # noqa: E731
            assert pragma("journal_mode") == "wal"
            assert pragma("foreign_keys") == 1
            assert pragma("busy_timeout") == 30000
            with pytest.raises(sa.exc.IntegrityError):
                conn.exec_driver_sql(
                    "INSERT INTO strata (job_id, key, \"values\", status, attempts, updated_at)"
                    " VALUES (999, 'k', '{}', 'pending', 0, '2024-01-01 00:00:00.000000')"
                )


def test_in_memory_sqlite_shares_one_database():
    with Store("sqlite://") as store:
        store.upgrade()
        job, _ = store.submit_job(name="m", spec={}, spec_hash="h")
        assert store.get_job(job.id).name == "m"
